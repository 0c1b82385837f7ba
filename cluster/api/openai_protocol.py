"""OpenAI wire format: request models, their conversion to SamplingParams, and response / stream chunk building.

Requests are validated strictly ("1" is not an integer, 1 is not a boolean), unknown fields are ignored, and
explicit nulls mean "default", as in OpenAI's API. Besides OpenAI's fields, vLLM's extensions top_k, ignore_eos,
min_tokens, stop_token_ids and return_token_ids are accepted.

Chat: `tools` / `tool_choice` / `parallel_tool_calls` / `response_format` are validated and resolved by
tool_parser.tool_setup (tools in the prompt unless tool_choice is "none"; "required", a named function and
response_format json_object / json_schema are enforced by guided decoding, cluster/engine/guided.py). Responses are
parsed by tool_parser into `content`, `reasoning_content` (the <think> part) and `tool_calls`. vLLM's guided_json
and guided_regex extensions are accepted on both routes.

With return_token_ids, responses carry the ids as vLLM does: completions put `prompt_token_ids` and `token_ids` on
the choice, chat puts `prompt_token_ids` at the top level and `token_ids` on the choice; in streams
`prompt_token_ids` comes once (the first chunk) and every chunk's `token_ids` is that chunk's delta.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from ..engine.guided import GuidedSpec
from ..engine.sampling import InvalidRequest, SamplingParams, TokenLogprobs
from ..engine.sequence import RequestOutput
from .tool_parser import ToolSetup, tool_setup

MAX_LOGPROBS = 20
LOGPROB_FLOOR = -9999.0  # JSON has no -inf (a token masked by min_tokens has logprob -inf)


# ---- requests ------------------------------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool | None = False


def _reject(unsupported: bool, param: str, message: str) -> None:
    if unsupported:
        raise InvalidRequest(f"{param}: {message}", param)


class GenerationRequest(_Strict):
    """The fields /v1/completions and /v1/chat/completions share."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: list[str] | None = None  # a single string is accepted too
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # ignored
    # vLLM extensions
    top_k: int | None = None  # -1 or 0: all tokens
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    return_token_ids: bool | None = None
    guided_json: Any = None  # a JSON schema the output must match (grammar-constrained decoding)
    guided_regex: str | None = None  # a regular expression the output must match

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_string(cls, value):
        return [value] if isinstance(value, str) else value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def check(self) -> None:
        """Raises InvalidRequest (-> 400 naming the field) for what this server does not do or accept. Call it
        before to_sampling_params (the engine validates the ranges of the sampling parameters)."""
        _reject(self.n not in (None, 1), "n", "only n=1 is supported")
        for name in ("presence_penalty", "frequency_penalty"):
            _reject(getattr(self, name) not in (None, 0), name, "is not supported (only 0)")
        _reject(bool(self.logit_bias), "logit_bias", "is not supported")
        _reject(self.stream_options is not None and not self.stream, "stream_options",
                "is only allowed when stream is true")

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def engine_logprobs(self) -> int | None:
        """SamplingParams.logprobs: None for none, k for the chosen token plus k alternatives."""
        return None

    def guided_spec(self) -> GuidedSpec | None:
        """SamplingParams.guided: what grammar-constrained decoding enforces (None: nothing)."""
        return self._vllm_guided()

    def _vllm_guided(self) -> GuidedSpec | None:
        _reject(self.guided_json is not None and self.guided_regex is not None, "guided_regex",
                "cannot be combined with guided_json")
        if self.guided_json is not None:
            schema = self.guided_json
            if isinstance(schema, str):  # vLLM accepts the schema as a JSON string too
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as e:
                    raise InvalidRequest(f"guided_json: not valid JSON ({e})", "guided_json") from None
            return GuidedSpec.json_schema(schema, "guided_json")
        if self.guided_regex is not None:
            return GuidedSpec.regex_spec(self.guided_regex, "guided_regex")
        return None

    def to_sampling_params(self, num_prompt_tokens: int, max_model_len: int,
                           max_tokens_cap: int | None = None) -> SamplingParams:
        """Unset max_tokens means the rest of the context (as vLLM does), within the server's per-request cap."""
        max_tokens = self.requested_max_tokens()
        if max_tokens is None:
            max_tokens = max(1, max_model_len - num_prompt_tokens)  # a too long prompt gets the engine's error
            if max_tokens_cap is not None:
                max_tokens = min(max_tokens, max_tokens_cap)
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k in (None, 0) else self.top_k,
            seed=self.seed,
            stop=list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=bool(self.ignore_eos),
            min_tokens=self.min_tokens or 0,
            logprobs=self.engine_logprobs(),
            guided=self.guided_spec(),
        )


class CompletionRequest(GenerationRequest):
    # a string, token ids, or a list holding one of those; becomes `str | list[int]`
    prompt: Any = Field(...)
    logprobs: int | None = None
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        def is_ids(x):
            return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        if isinstance(value, str) or is_ids(value):
            return value
        if isinstance(value, list) and all(isinstance(p, str) or is_ids(p) for p in value):
            if len(value) > 1:
                raise ValueError(f"batches of prompts are not supported (got {len(value)} prompts); "
                                 "send one prompt per request")
            return value[0]
        raise ValueError("must be a string, a list of token ids, or a list holding one of those")

    def check(self) -> None:
        super().check()
        _reject(bool(self.echo), "echo", "is not supported")
        _reject(self.best_of not in (None, 1), "best_of", "only best_of=1 is supported")
        _reject(bool(self.suffix), "suffix", "is not supported")

    def engine_logprobs(self) -> int | None:
        return self.logprobs


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]  # developer: OpenAI's newer name for system
    content: list[TextPart] | None = None  # a plain string is accepted too
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value):
        if isinstance(value, str):
            return [{"type": "text", "text": value}]
        if isinstance(value, list):
            for i, part in enumerate(value):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind is not None and kind != "text":
                    raise ValueError(f"part {i} has type {kind!r}; only text parts are supported")
        return value

    def to_template(self) -> dict:
        """The OpenAI-shaped dict Tokenizer.apply_chat_template takes."""
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                                   "content": None if self.content is None else [p.model_dump() for p in self.content]}
        for key in ("name", "tool_calls", "tool_call_id"):
            if getattr(self, key) is not None:
                message[key] = getattr(self, key)
        return message


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # tools / tool_choice / response_format: see tool_parser.tool_setup (validated in check(), 400 naming the field)
    tools: list[Any] | None = None
    tool_choice: Any = None  # "none" | "auto" | "required" | {"type": "function", "function": {"name": ...}}
    parallel_tool_calls: bool | None = None  # false: a forced tool call makes exactly one call
    response_format: Any = None  # {"type": "text" | "json_object" | "json_schema", "json_schema": {...}}
    _setup: ToolSetup | None = PrivateAttr(None)

    def check(self) -> None:
        super().check()
        _reject(self.top_logprobs is not None and not self.logprobs, "top_logprobs",
                "requires logprobs to be true")
        self._setup = tool_setup(self.tools, self.tool_choice, self.response_format, self.parallel_tool_calls,
                                 guided=self._vllm_guided())
        for i, m in enumerate(self.messages):
            _reject(m.content is None and m.role != "assistant", f"messages[{i}].content",
                    f"is required for {m.role} messages")

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def engine_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_messages(self) -> list[dict]:
        return [m.to_template() for m in self.messages]

    @property
    def setup(self) -> ToolSetup:
        if self._setup is None:
            self._setup = tool_setup(self.tools, self.tool_choice, self.response_format, self.parallel_tool_calls,
                                     guided=self._vllm_guided())
        return self._setup

    def template_tools(self) -> list[dict] | None:
        """OpenAI's {"type": "function", "function": {...}} -> the bare function schemas MiniMax's template expects;
        None without tools or with tool_choice "none"."""
        return self.setup.prompt_tools

    def guided_spec(self) -> GuidedSpec | None:
        return self.setup.guided


# ---- token text ----------------------------------------------------------------------------------------------------
def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE (GPT-2 style) writes each byte as one printable character; this maps them back."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF_CHAR = _byte_level_alphabet()


class TokenText:
    """Token id -> (text, raw bytes) for logprobs. The bytes are exact even for a token that ends mid-character,
    whose text then shows U+FFFD. Without a tokenizer a token reads "token_id:<id>"."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            piece = self.tokenizer.id_to_token(token_id) if self.tokenizer is not None else None
            if piece is None:
                raw = f"token_id:{token_id}".encode()
            elif all(c in _BYTE_OF_CHAR for c in piece):
                raw = bytes(_BYTE_OF_CHAR[c] for c in piece)
            else:  # not byte-level encoded (an added token with other characters)
                raw = piece.encode()
            hit = self._cache[token_id] = (raw.decode("utf-8", errors="replace"), list(raw))
        return hit


def _logprob(value: float) -> float:
    return max(value, LOGPROB_FLOOR)


def usage(out: RequestOutput) -> dict:
    return {"prompt_tokens": out.num_prompt_tokens, "completion_tokens": out.num_output_tokens,
            "total_tokens": out.num_prompt_tokens + out.num_output_tokens}


# ---- responses -----------------------------------------------------------------------------------------------------
class ResponseBuilder:
    """Builds one request's response, or its stream chunks one engine output at a time."""

    id_prefix = ""
    response_object = ""
    chunk_object = ""

    def __init__(self, request: GenerationRequest, model: str, prompt_ids: list[int], token_text: TokenText):
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.prompt_ids = prompt_ids
        self.token_text = token_text
        self.return_token_ids = bool(request.return_token_ids)
        self.want_logprobs = request.engine_logprobs() is not None
        self.include_usage = request.include_usage
        self._sent_prompt_ids = False

    def _envelope(self, object: str, choices: list[dict], **extra) -> dict:
        return {"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def _first_prompt_ids(self) -> list[int] | None:
        """The prompt ids for the first chunk of a stream that asked for them, else None."""
        if not self.return_token_ids or self._sent_prompt_ids:
            return None
        self._sent_prompt_ids = True
        return self.prompt_ids

    def _skip(self, out: RequestOutput) -> bool:
        """An output with no text (a token held back or mid-character) is only sent when its ids/logprobs count."""
        return not out.text and not out.finished and not (self.return_token_ids or self.want_logprobs)

    def _choice(self, out: RequestOutput, **body) -> dict:
        choice = {"index": 0, **body, "logprobs": self._logprobs(out.logprobs) if self.want_logprobs else None,
                  "finish_reason": out.finish_reason if out.finished else None}
        if self.return_token_ids:
            choice["token_ids"] = list(out.token_ids)
        return choice

    def _logprobs(self, entries: list[TokenLogprobs]) -> dict:
        raise NotImplementedError

    def usage_chunk(self, out: RequestOutput) -> dict:
        return self._envelope(self.chunk_object, [], usage=usage(out))

    def preamble(self) -> list[dict]:
        """Chunks a stream starts with, before any output."""
        return []

    def response(self, out: RequestOutput) -> dict:  # the merged, finished output
        raise NotImplementedError

    def chunk(self, out: RequestOutput) -> dict | None:  # one streamed output; None: nothing to send
        raise NotImplementedError


class CompletionBuilder(ResponseBuilder):
    id_prefix = "cmpl"
    response_object = chunk_object = "text_completion"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._text_offset = 0  # text_offset of the next token (continues across stream chunks)

    def _logprobs(self, entries: list[TokenLogprobs]) -> dict:
        tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
        for e in entries:
            text = self.token_text(e.token_id)[0]
            tokens.append(text)
            token_logprobs.append(_logprob(e.logprob))
            top = {text: _logprob(e.logprob)}  # the chosen token and its alternatives, as vLLM reports them
            for t, v in e.top:  # best first; tokens whose text is the same (say "\ufffd") keep the first value
                top.setdefault(self.token_text(t)[0], _logprob(v))
            top_logprobs.append(top)
            text_offset.append(self._text_offset)
            self._text_offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                "text_offset": text_offset}

    def _text_choice(self, out: RequestOutput, prompt_ids: list[int] | None) -> dict:
        choice = self._choice(out, text=out.text)
        if self.return_token_ids and prompt_ids is not None:
            choice["prompt_token_ids"] = prompt_ids
        return choice

    def response(self, out: RequestOutput) -> dict:
        return self._envelope(self.response_object, [self._text_choice(out, self.prompt_ids)], usage=usage(out))

    def chunk(self, out: RequestOutput) -> dict | None:
        if self._skip(out):
            return None
        return self._envelope(self.chunk_object, [self._text_choice(out, self._first_prompt_ids())])


class ChatBuilder(ResponseBuilder):
    """Chat responses: the output is parsed into content, reasoning_content (MiniMax's <think> part) and tool_calls
    (tool_parser.py). Streams carry the same as deltas; tool calls come whole, one delta entry per call with its
    index, id, type, name and complete arguments. finish_reason is "tool_calls" when calls were made and the model
    stopped by itself."""

    id_prefix = "chatcmpl"
    response_object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, request: ChatCompletionRequest, *args, **kwargs):
        super().__init__(request, *args, **kwargs)
        self.setup = request.setup
        self.parser = self.setup.parser()

    @staticmethod
    def _finish_reason(choice: dict, called_tools: bool) -> dict:
        if called_tools and choice["finish_reason"] == "stop":
            choice["finish_reason"] = "tool_calls"
        return choice

    def _logprobs(self, entries: list[TokenLogprobs]) -> dict:
        def entry(token_id, logprob):
            text, raw = self.token_text(token_id)
            return {"token": text, "logprob": _logprob(logprob), "bytes": raw}

        return {"content": [{**entry(e.token_id, e.logprob), "top_logprobs": [entry(t, v) for t, v in e.top]}
                            for e in entries]}

    def response(self, out: RequestOutput) -> dict:
        parsed = self.setup.parse(out.text)
        message = {"role": "assistant", "content": parsed.content}
        if parsed.reasoning_content is not None:
            message["reasoning_content"] = parsed.reasoning_content
        if parsed.tool_calls:
            message["tool_calls"] = parsed.message_tool_calls()
        choice = self._finish_reason(self._choice(out, message=message), bool(parsed.tool_calls))
        extra = {"prompt_token_ids": self.prompt_ids} if self.return_token_ids else {}
        return self._envelope(self.response_object, [choice], usage=usage(out), **extra)

    def preamble(self) -> list[dict]:
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        prompt_ids = self._first_prompt_ids()
        extra = {"prompt_token_ids": prompt_ids} if prompt_ids is not None else {}
        return [self._envelope(self.chunk_object, [choice], **extra)]

    def chunk(self, out: RequestOutput) -> dict | None:
        delta = self.parser.feed(out.text) if out.text else {}
        if out.finished:
            for key, value in self.parser.finish().items():
                delta[key] = delta[key] + value if key in delta else value
        if not delta and not out.finished and not (self.return_token_ids or self.want_logprobs):
            return None  # nothing to show yet (a token mid-character, or text held back by the parser)
        choice = self._finish_reason(self._choice(out, delta=delta), self.parser.called_tools)
        return self._envelope(self.chunk_object, [choice])
