"""The OpenAI-compatible HTTP API over an AsyncEngine. Plain FastAPI: the Ray Serve router returns create_app(...)
from its __serve_build_asgi_app__, and anything ASGI (uvicorn, tests) can serve it too.

Routes: GET /health (never needs the API key), GET /v1/models, GET /v1/models/{id}, POST /v1/completions,
POST /v1/chat/completions. Request/response format: openai_protocol.py; errors: errors.py.

Streams are server-sent events: `data: {chunk}\\n\\n` per chunk, then `data: [DONE]\\n\\n`. If generation fails
after the stream has started (a request the engine ends with "error"/"abort", or an unexpected exception), the
stream sends `data: {"error": {...}}\\n\\n` and then `data: [DONE]\\n\\n`, as vLLM does; the official client raises
an APIError on the error event.

A client that disconnects stops its generation: the engine request is aborted (freeing its slot and KV blocks)
while it waits in the queue, during prefill, or mid-stream.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import Headers

from model_shards.tokenizer import TokenizerError

from ..engine.async_engine import AsyncEngine
from ..engine.sampling import InvalidRequest
from ..engine.sequence import RequestOutput
from ..metrics import Metrics
from .errors import APIError, generation_failed, install_error_handlers, internal_error
from .openai_protocol import (ChatBuilder, ChatCompletionRequest, CompletionBuilder, CompletionRequest,
                              GenerationRequest, ResponseBuilder, TokenText)

log = logging.getLogger("m1serve.api")

DEFAULT_MAX_BODY_BYTES = 8 * 2**20
FAILED = ("error", "abort", "timeout")  # engine finish reasons that are failures for the client


def create_app(engine: AsyncEngine, api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               metrics: Metrics | None = None) -> FastAPI:
    app = FastAPI(title="m1serve", summary="OpenAI-compatible API for MiniMax-M1", docs_url=None, redoc_url=None)
    install_error_handlers(app)
    app.state.metrics = metrics = metrics or Metrics(None)
    app.add_middleware(RequestGuard, api_key=api_key, max_body_bytes=max_body_bytes, metrics=metrics)
    token_text = TokenText(engine.tokenizer)
    started = int(time.time())

    def model_card() -> dict:
        return {"id": engine.model_name, "object": "model", "created": started, "owned_by": "m1serve",
                "max_model_len": engine.max_model_len}

    def check_model(name: str) -> None:
        if name != engine.model_name:
            raise APIError(404, f"The model '{name}' does not exist (this server serves '{engine.model_name}').",
                           param="model", code="model_not_found")

    @app.get("/health")
    async def health():
        if engine.healthy:
            return {"status": "ok"}
        return APIError(503, "The engine is not healthy.", "server_error", code="engine_unhealthy").response()

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str):
        check_model(model_id)
        return model_card()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        body.check()
        prompt_ids = await _encode(engine, body.prompt)
        builder = CompletionBuilder(body, engine.model_name, prompt_ids, token_text)
        return await _respond(request, engine, body, prompt_ids, builder)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        body.check()
        prompt_ids = await _render_chat(engine, body)
        builder = ChatBuilder(body, engine.model_name, prompt_ids, token_text)
        return await _respond(request, engine, body, prompt_ids, builder)

    return app


# ---- prompts -------------------------------------------------------------------------------------------------------
# Tokenizing / rendering runs in a worker thread: a long prompt must not stall every other stream on the loop.
async def _encode(engine: AsyncEngine, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, list):
        return prompt  # the engine checks the ids against the vocabulary
    if engine.tokenizer is None:
        raise InvalidRequest("prompt: this model has no tokenizer; send token ids", "prompt")
    return await asyncio.to_thread(engine.tokenizer.encode, prompt)


async def _render_chat(engine: AsyncEngine, body: ChatCompletionRequest) -> list[int]:
    tokenizer = engine.tokenizer
    if tokenizer is None:
        raise InvalidRequest("messages: this model has no tokenizer (and so no chat template); use /v1/completions "
                             "with token ids", "messages")

    def render() -> list[int]:
        text = tokenizer.apply_chat_template(body.template_messages(), body.template_tools(),
                                             add_generation_prompt=True)
        return tokenizer.encode(text)

    try:
        return await asyncio.to_thread(render)
    except TokenizerError as e:
        raise InvalidRequest(f"messages: {e}", "messages") from e


# ---- generation ----------------------------------------------------------------------------------------------------
class _ClientGone(Exception):
    pass


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, coro):
    """Awaits coro; if the client disconnects first, cancels it (which aborts its engine request) and raises
    _ClientGone."""
    work = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait((work, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)  # let the abort happen before we go on
    if work.cancelled():
        raise _ClientGone()
    return work.result()


async def _respond(request: Request, engine: AsyncEngine, body: GenerationRequest, prompt_ids: list[int],
                   builder: ResponseBuilder) -> Response:
    params = body.to_sampling_params(len(prompt_ids), engine.max_model_len, engine.max_tokens_limit)
    if not body.stream:
        try:
            out = await _unless_disconnected(request, engine.generate(prompt_ids, params, builder.id))
        except _ClientGone:
            return Response(status_code=499)  # nobody reads it
        if out.finish_reason in FAILED:
            log.error("request %s failed in the engine: %s (%s)", builder.id, out.finish_reason, out.error)
            raise generation_failed(out)
        return JSONResponse(builder.response(out))

    outputs = engine.stream(prompt_ids, params, builder.id)

    async def first_output() -> RequestOutput:
        return await outputs.__anext__()  # submits: InvalidRequest / QueueFull / EngineUnavailable raise here

    try:
        # waiting for the first output (queue + prefill) happens before the 200 goes out, so errors are plain
        # HTTP errors; a disconnect meanwhile aborts the request too
        first = await _unless_disconnected(request, first_output())
    except _ClientGone:
        await outputs.aclose()
        return Response(status_code=499)
    return EventStream(_events(builder, first, outputs, request.app.state.metrics))


async def _events(builder: ResponseBuilder, first: RequestOutput, outputs, metrics: Metrics):
    try:
        for chunk in builder.preamble():
            yield _event(chunk)
        out = first
        while True:
            if out.finish_reason in FAILED:
                log.error("stream %s failed in the engine: %s (%s)", builder.id, out.finish_reason, out.error)
                metrics.request_error(503)
                yield _event(generation_failed(out).body)
                break
            chunk = builder.chunk(out)
            if chunk is not None:
                yield _event(chunk)
            if out.finished:
                if builder.include_usage:
                    yield _event(builder.usage_chunk(out))
                break
            out = await outputs.__anext__()
    except Exception:
        log.exception("stream %s failed", builder.id)
        metrics.request_error(500)
        yield _event(internal_error().body)
    finally:
        await outputs.aclose()  # aborts the engine request unless it finished
    yield "data: [DONE]\n\n"


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


class EventStream(StreamingResponse):
    """Server-sent events. However the response ends (finished, client gone, cancelled, send failed), the event
    generator is closed, which closes the engine stream and so aborts the request."""

    media_type = "text/event-stream"

    def __init__(self, events):
        super().__init__(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


# ---- middleware ----------------------------------------------------------------------------------------------------
class RequestGuard:
    """ASGI middleware in front of every route: the API key on /v1 routes (checked before the body is read), then
    the body size limit (413). The body is read here and replayed to the app; later receive() calls pass through,
    so the app still sees the client's disconnect."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, metrics: Metrics):
        self.app, self.max_body_bytes, self.metrics = app, max_body_bytes, metrics
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        send = self._counting_errors(send)
        headers = Headers(scope=scope)
        if self.api_key is not None and scope["path"].startswith("/v1") and not self._authorized(headers):
            given = "authorization" in headers
            err = APIError(401, "Incorrect API key provided." if given else
                           "Missing API key: send it in the header 'Authorization: Bearer <key>'.",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            return await err.response()(scope, receive, send)
        too_large = APIError(413, f"The request body is larger than the limit ({self.max_body_bytes} bytes).",
                             code="request_too_large")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return await too_large.response()(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return await too_large.response()(scope, receive, send)
            if not message.get("more_body", False):
                break
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)

    def _counting_errors(self, send):
        async def counted(message):
            if message["type"] == "http.response.start" and message["status"] >= 400:
                self.metrics.request_error(message["status"])
            await send(message)
        return counted

    def _authorized(self, headers: Headers) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key)
