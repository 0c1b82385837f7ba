"""gRPC handlers for the M1Serve service (cluster/api/m1serve.proto), independent of the transport.

The Ray Serve router deployment delegates its gRPC methods to them:

    async def Generate(self, request, grpc_context=None):
        return await grpc_service.generate(self.engine, request, grpc_context)

    async def GenerateStream(self, request, grpc_context=None):
        async for message in grpc_service.generate_stream(self.engine, request, grpc_context):
            yield message

`context` only needs `set_code(grpc.StatusCode)` and `set_details(str)` (Ray Serve's RayServegRPCContext has both and
the proxy returns that status once the method returns, or once the stream ends). On an error the handlers set the
status and return an empty GenerateResponse (unary) or stop the stream. `context=None` raises `GrpcError` instead.

`M1ServeServicer` runs the same handlers on a plain `grpc.aio` server (tests, standalone use): errors become
`context.abort(code, details)`.

Chat and tools: a `messages` prompt is rendered with the chat template (with `tools` unless tool_choice is "none");
tool_choice "required"/a name and response_format are enforced by guided decoding; the output is parsed as the HTTP
chat API does (cluster/api/tool_parser.py): `text` is the content, `reasoning_content` the <think> part (messages
prompts only), `tool_calls` the calls (streamed whole, in the message where their block completes), finish_reason
"tool_calls" when calls were made.

Error mapping: InvalidRequest -> INVALID_ARGUMENT (details start with the field: "max_tokens: ..."),
QueueFull -> RESOURCE_EXHAUSTED, EngineUnavailable or an engine result that ended in "error"/"abort" -> UNAVAILABLE,
anything else -> INTERNAL with a generic message (the traceback goes to the server log only).
Cancelling the call (client disconnect) aborts the request in the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import uuid
from typing import AsyncIterator

import grpc

from cluster.api import m1serve_pb2 as pb
from cluster.api import m1serve_pb2_grpc as pb_grpc
from cluster.api.tool_parser import ParsedOutput, StreamParser, ToolSetup, tool_setup
from cluster.engine.async_engine import AsyncEngine
from cluster.engine.engine import EngineUnavailable, QueueFull
from cluster.engine.sampling import InvalidRequest, SamplingParams, TokenLogprobs
from cluster.engine.sequence import RequestOutput
from cluster.metrics import Metrics
from model_shards.tokenizer import TokenizerError

log = logging.getLogger(__name__)

INTERNAL_DETAILS = "internal server error"
# GenerateRequest `optional` field -> SamplingParams field (unset: SamplingParams' default)
_OPTIONAL_PARAMS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "ignore_eos", "min_tokens", "logprobs")


class GrpcError(Exception):
    """A gRPC status to return: raised inside the handlers, and out of them when no context is given."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


# ---- request / response conversion --------------------------------------------------------------------------------
def _check_model(engine: AsyncEngine, request: pb.GenerateRequest) -> None:
    if request.model and request.model != engine.model_name:
        raise InvalidRequest(f"model: '{request.model}' is not served here (this server serves "
                             f"'{engine.model_name}')", "model")


def request_prompt(request: pb.GenerateRequest) -> str | list[int]:
    which = request.WhichOneof("prompt")
    if which == "text":
        return request.text
    if which == "prompt_token_ids":
        return list(request.prompt_token_ids.ids)
    raise InvalidRequest("prompt: set text, prompt_token_ids or messages", "prompt")


def request_params(request: pb.GenerateRequest, setup: ToolSetup | None = None) -> SamplingParams:
    """The request's sampling parameters, validated (InvalidRequest names the field); guided decoding from the
    request's tool setup (request_tools)."""
    kwargs = {name: getattr(request, name) for name in _OPTIONAL_PARAMS if request.HasField(name)}
    params = SamplingParams(stop=list(request.stop), stop_token_ids=list(request.stop_token_ids),
                            guided=setup.guided if setup is not None else None, **kwargs)
    return params.validate()


def _json_field(raw: str, param: str):
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise InvalidRequest(f"{param}: not valid JSON ({e})", param) from None


def request_tools(request: pb.GenerateRequest) -> ToolSetup:
    """tools / tool_choice / response_format / parallel_tool_calls, validated as the HTTP API does."""
    tools = [_json_field(raw, f"tools[{i}]") for i, raw in enumerate(request.tools)]
    fmt = _json_field(request.response_format, "response_format") if request.response_format else None
    parallel = request.parallel_tool_calls if request.HasField("parallel_tool_calls") else None
    return tool_setup(tools or None, request.tool_choice or None, fmt, parallel)


def _chat_messages(request: pb.GenerateRequest) -> list[dict]:
    out = []
    for m in request.messages.messages:
        message = {"role": "system" if m.role == "developer" else m.role, "content": m.content}
        if m.name:
            message["name"] = m.name
        if m.tool_call_id:
            message["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            message["tool_calls"] = [{"id": c.id or None, "type": "function",
                                      "function": {"name": c.name, "arguments": c.arguments}} for c in m.tool_calls]
        out.append(message)
    return out


async def _prepare(engine: AsyncEngine, request: pb.GenerateRequest):
    """-> (prompt, params, setup, chat): `messages` prompts are rendered with the chat template (in a thread)."""
    _check_model(engine, request)
    setup = request_tools(request)
    chat = request.WhichOneof("prompt") == "messages"
    if chat:
        tokenizer = engine.tokenizer
        if tokenizer is None:
            raise InvalidRequest("messages: this model has no tokenizer (and so no chat template); send token ids",
                                 "messages")
        if not request.messages.messages:
            raise InvalidRequest("messages: must not be empty", "messages")

        def render() -> list[int]:
            return tokenizer.encode(tokenizer.apply_chat_template(_chat_messages(request), setup.prompt_tools))

        try:
            prompt = await asyncio.to_thread(render)
        except TokenizerError as e:
            raise InvalidRequest(f"messages: {e}", "messages") from None
    else:
        prompt = request_prompt(request)
    return prompt, request_params(request, setup), setup, chat


def _tool_calls(calls: list[dict]) -> list[pb.ToolCall]:
    return [pb.ToolCall(index=c["index"], id=c["id"], name=c["function"]["name"],
                        arguments=c["function"]["arguments"]) for c in calls]


def _finish_reason(out: RequestOutput, called_tools: bool) -> str:
    return "tool_calls" if called_tools and out.finish_reason == "stop" else out.finish_reason or ""


def _logprobs(entries: list[TokenLogprobs]) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token_id=e.token_id, logprob=e.logprob,
                            top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in e.top]) for e in entries]


def _usage(out: RequestOutput) -> pb.Usage:
    return pb.Usage(prompt_tokens=out.num_prompt_tokens, completion_tokens=out.num_output_tokens,
                    total_tokens=out.num_prompt_tokens + out.num_output_tokens)


def _check_result(out: RequestOutput) -> None:
    """An engine-side failure of an accepted request ("error": shard group down, failed step; "abort": the engine
    shut down) -> UNAVAILABLE. Internal exception texts stay in the server log."""
    if out.finish_reason == "timeout":
        raise GrpcError(grpc.StatusCode.DEADLINE_EXCEEDED, out.error or "the request timed out")
    if out.finish_reason in ("error", "abort"):
        if out.finish_reason == "abort":
            details = "the engine shut down"
        elif out.error and not out.error.startswith("internal error"):
            details = out.error
        else:
            details = "the engine failed this request; retry"
        raise GrpcError(grpc.StatusCode.UNAVAILABLE, details)


def _to_grpc_error(e: Exception) -> GrpcError:
    if isinstance(e, GrpcError):
        return e
    if isinstance(e, InvalidRequest):
        details = str(e)
        if e.param and not details.startswith(f"{e.param}:"):  # lead with the field the engine blamed
            head, sep, rest = details.partition(": ")
            details = f"{e.param}: {rest if sep and head.isidentifier() else details}"
        return GrpcError(grpc.StatusCode.INVALID_ARGUMENT, details)
    if isinstance(e, QueueFull):
        return GrpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"server busy: {e}")
    if isinstance(e, EngineUnavailable):
        return GrpcError(grpc.StatusCode.UNAVAILABLE, str(e))
    log.error("unexpected error in a gRPC handler", exc_info=e)
    return GrpcError(grpc.StatusCode.INTERNAL, INTERNAL_DETAILS)


def _report(context, e: Exception, metrics: Metrics | None) -> None:
    err = _to_grpc_error(e)
    if metrics is not None:
        metrics.request_error(err.code.name)
    if context is None:
        raise err from (None if err is e else e)
    context.set_code(err.code)
    context.set_details(err.details)


def _ids(request: pb.GenerateRequest) -> tuple[str, str]:
    """(engine request id: unique, client request id to echo)."""
    engine_id = uuid.uuid4().hex
    if request.request_id:
        engine_id = f"{request.request_id[:64]}-{engine_id[:12]}"
    return engine_id, request.request_id or engine_id


# ---- handlers ------------------------------------------------------------------------------------------------------
def check_api_key(context, api_key: str | None) -> None:
    """With an API key configured, calls must carry metadata `authorization: Bearer <key>` (constant-time check)."""
    if api_key is None:
        return
    given = ""
    for key, value in (context.invocation_metadata() if context is not None else ()) or ():
        if key.lower() == "authorization" and value.startswith("Bearer "):
            given = value[len("Bearer "):]
    if not hmac.compare_digest(given.encode(), api_key.encode()):
        raise GrpcError(grpc.StatusCode.UNAUTHENTICATED, "missing or incorrect API key: send metadata "
                                                         "'authorization: Bearer <key>'")


async def generate(engine: AsyncEngine, request: pb.GenerateRequest, context=None,
                   metrics: Metrics | None = None, api_key: str | None = None) -> pb.GenerateResponse:
    """Unary Generate. On an error: sets the status on `context` and returns an empty GenerateResponse."""
    try:
        check_api_key(context, api_key)
        prompt, params, setup, chat = await _prepare(engine, request)
        engine_id, client_id = _ids(request)
        out = await engine.generate(prompt, params, engine_id)
        _check_result(out)
        parsed = setup.parse(out.text, parse_reasoning=chat) if chat or setup.parse_tools else ParsedOutput(out.text)
        return pb.GenerateResponse(text=parsed.content or "", token_ids=out.token_ids,
                                   prompt_token_ids=out.prompt_token_ids or [],
                                   finish_reason=_finish_reason(out, bool(parsed.tool_calls)), usage=_usage(out),
                                   logprobs=_logprobs(out.logprobs), request_id=client_id,
                                   reasoning_content=parsed.reasoning_content or "",
                                   tool_calls=_tool_calls(parsed.tool_calls))
    except Exception as e:  # CancelledError (a BaseException) passes through: engine.stream aborts the request
        _report(context, e, metrics)
        return pb.GenerateResponse()


async def generate_stream(engine: AsyncEngine, request: pb.GenerateRequest, context=None,
                          metrics: Metrics | None = None,
                          api_key: str | None = None) -> AsyncIterator[pb.GenerateStreamResponse]:
    """Server-streaming GenerateStream. On an error: sets the status on `context` and ends the stream. Closing this
    generator early (client cancelled) closes the engine stream, which aborts the request."""
    try:
        check_api_key(context, api_key)
        prompt, params, setup, chat = await _prepare(engine, request)
        engine_id, client_id = _ids(request)
        parser: StreamParser | None = setup.parser(parse_reasoning=chat) if chat or setup.parse_tools else None
        async with contextlib.aclosing(engine.stream(prompt, params, engine_id)) as outputs:
            async for out in outputs:
                _check_result(out)
                delta = {"content": out.text}
                if parser is not None:
                    delta = parser.feed(out.text) if out.text else {}
                    if out.finished:
                        for key, value in parser.finish().items():
                            delta[key] = delta[key] + value if key in delta else value
                message = pb.GenerateStreamResponse(text=delta.get("content", ""), token_ids=out.token_ids,
                                                    logprobs=_logprobs(out.logprobs), request_id=client_id,
                                                    reasoning_content=delta.get("reasoning_content", ""),
                                                    tool_calls=_tool_calls(delta.get("tool_calls", [])))
                if out.prompt_token_ids is not None:
                    message.prompt_token_ids.extend(out.prompt_token_ids)
                if out.finished:
                    message.finish_reason = _finish_reason(out, parser is not None and parser.called_tools)
                    message.usage.CopyFrom(_usage(out))
                yield message
    except Exception as e:
        _report(context, e, metrics)


# ---- plain grpc.aio server ----------------------------------------------------------------------------------------
class _StatusContext:
    """set_code/set_details recorder in front of a grpc.aio ServicerContext (other attributes pass through)."""

    def __init__(self, context: grpc.aio.ServicerContext):
        self._context = context
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    async def abort_if_failed(self) -> None:
        if self.code is not None and self.code != grpc.StatusCode.OK:
            await self._context.abort(self.code, self.details)

    def __getattr__(self, name):
        return getattr(self._context, name)


class M1ServeServicer(pb_grpc.M1ServeServicer):
    """The M1Serve service on a plain grpc.aio server:

        server = grpc.aio.server()
        m1serve_pb2_grpc.add_M1ServeServicer_to_server(M1ServeServicer(async_engine), server)
    """

    def __init__(self, engine: AsyncEngine, api_key: str | None = None, metrics: Metrics | None = None):
        self.engine, self.api_key, self.metrics = engine, api_key, metrics

    async def Generate(self, request, context):
        status = _StatusContext(context)
        response = await generate(self.engine, request, status, self.metrics, self.api_key)
        await status.abort_if_failed()
        return response

    async def GenerateStream(self, request, context):
        status = _StatusContext(context)
        # aclosing: a cancelled call closes the handler (and so the engine stream) right away, not at GC
        async with contextlib.aclosing(generate_stream(self.engine, request, status, self.metrics,
                                                       self.api_key)) as messages:
            async for message in messages:
                yield message
        await status.abort_if_failed()
