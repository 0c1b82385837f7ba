"""The OpenAI-compatible HTTP API (cluster/api/openai_api.py) over the tiny model's engine on CPU.

Most cases go through httpx's ASGI transport; the client-compatibility ones run the app under uvicorn on a free
local port and drive it with the official `openai` client.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading

import httpx
import openai
import pytest
import uvicorn

from cluster.api.openai_api import create_app
from cluster.api.openai_protocol import ChatCompletionRequest, CompletionRequest
from cluster.engine.async_engine import AsyncEngine
from cluster.engine.engine import Engine, EngineConfig, EngineUnavailable, QueueFull
from cluster.engine.sampling import SamplingParams
from cluster.engine.sequence import RequestOutput

from conftest import random_ids
from engine_helpers import wait_for

MODEL = "m1serve-tiny"
API_KEY = "sk-test-key"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


# ---- fixtures ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(tiny_model):
    e = Engine(EngineConfig(model=str(tiny_model), max_num_seqs=8, max_model_len=1024))
    yield AsyncEngine(e, MODEL)
    e.shutdown()


@pytest.fixture(scope="module")
def app(engine):
    return create_app(engine)


@pytest.fixture
def anyio_backend():
    return "asyncio"


def asgi_client(app) -> httpx.AsyncClient:
    # raise_app_exceptions=False: a 500 is answered (as under uvicorn) although Starlette re-raises it for the log
    return httpx.AsyncClient(transport=httpx.ASGITransport(app, raise_app_exceptions=False), base_url="http://test",
                             timeout=30)


@contextlib.contextmanager
def serve(app):
    """The app under uvicorn in a background thread on 127.0.0.1 (free port); yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, timeout=10)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def server(app):
    with serve(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=30)


def reference(engine, prompt, max_tokens=8, **kw) -> RequestOutput:
    """What the engine itself generates greedily for the prompt."""
    return engine.engine.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw))


def chat_prompt(engine, messages, tools=None) -> str:
    return engine.tokenizer.apply_chat_template(messages, tools, add_generation_prompt=True)


def sse_payloads(raw: str) -> list:
    """Parses an SSE body, checking the framing: every event is one `data: ...` line followed by a blank line."""
    assert raw.endswith("data: [DONE]\n\n"), raw[-200:]
    events = raw.split("\n\n")
    assert events[-1] == ""
    payloads = []
    for event in events[:-1]:
        assert event.startswith("data: ") and "\n" not in event, event
        data = event[len("data: "):]
        payloads.append(data if data == "[DONE]" else json.loads(data))
    assert payloads.count("[DONE]") == 1
    return payloads


def assert_idle(engine, timeout=15.0):
    wait_for(lambda: (s := engine.engine.stats())["running"] == 0 and s["waiting"] == 0 and s["slots_used"] == 0,
             timeout)


# ---- the official client against uvicorn --------------------------------------------------------------------------
EXTRA = {"return_token_ids": True, "top_k": 1, "ignore_eos": True}


def test_client_completion_matches_engine(engine, client):
    ref = reference(engine, "The quick brown fox", ignore_eos=True)
    resp = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=8, temperature=0,
                                     extra_body=EXTRA)
    choice = resp.choices[0]
    assert resp.object == "text_completion" and resp.model == MODEL and resp.id.startswith("cmpl-")
    assert choice.text == ref.text and choice.finish_reason == "length"
    assert choice.model_extra["token_ids"] == ref.token_ids
    assert choice.model_extra["prompt_token_ids"] == engine.tokenizer.encode("The quick brown fox")
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == \
        (ref.num_prompt_tokens, 8, ref.num_prompt_tokens + 8)


def test_client_token_id_prompts(engine, client):
    ids = random_ids(12, 512, seed=1)
    ref = reference(engine, ids, ignore_eos=True)
    for prompt in (ids, [ids]):
        resp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, extra_body=EXTRA)
        assert resp.choices[0].model_extra["token_ids"] == ref.token_ids and resp.choices[0].text == ref.text
        assert resp.usage.prompt_tokens == 12


def test_client_chat_matches_engine(engine, client):
    ref = reference(engine, chat_prompt(engine, MESSAGES), ignore_eos=True)
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=8, temperature=0,
                                          extra_body=EXTRA)
    choice = resp.choices[0]
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content == ref.text
    assert choice.finish_reason == "length" and choice.model_extra["token_ids"] == ref.token_ids
    assert resp.model_extra["prompt_token_ids"] == ref.prompt_token_ids
    assert resp.usage.prompt_tokens == len(ref.prompt_token_ids) and resp.usage.completion_tokens == 8


def test_client_completion_stream(engine, client):
    ref = reference(engine, "Once upon a time", max_tokens=10, ignore_eos=True)
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}, extra_body=EXTRA))
    *content, last = chunks
    assert "".join(c.choices[0].text for c in content) == ref.text
    assert sum((c.choices[0].model_extra["token_ids"] for c in content), []) == ref.token_ids
    assert content[0].choices[0].model_extra["prompt_token_ids"] == ref.prompt_token_ids
    assert all("prompt_token_ids" not in c.choices[0].model_extra for c in content[1:])
    assert [c.choices[0].finish_reason for c in content] == [None] * (len(content) - 1) + ["length"]
    assert last.choices == [] and last.usage.completion_tokens == 10
    assert last.usage.prompt_tokens == len(ref.prompt_token_ids)


def test_client_chat_stream(engine, client):
    ref = reference(engine, chat_prompt(engine, MESSAGES), max_tokens=10, ignore_eos=True)
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body=EXTRA))
    first, *content, last = chunks
    assert first.choices[0].delta.role == "assistant" and first.model_extra["prompt_token_ids"] == ref.prompt_token_ids
    assert "".join(c.choices[0].delta.content or "" for c in content) == ref.text
    assert sum((c.choices[0].model_extra["token_ids"] for c in content), []) == ref.token_ids
    assert content[-1].choices[0].finish_reason == "length"
    assert last.choices == [] and last.usage.total_tokens == len(ref.prompt_token_ids) + 10


def test_client_models(engine, client):
    models = client.models.list().data
    assert [(m.id, m.object, m.owned_by) for m in models] == [(MODEL, "model", "m1serve")]
    assert models[0].model_extra["max_model_len"] == 1024
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=1)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"


def test_client_bad_request_names_field(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2)
    assert e.value.body["param"] == "n" and "n" in e.value.body["message"]


def test_api_key(engine):
    app = create_app(engine, api_key=API_KEY)
    with serve(app) as url:
        wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-wrong", max_retries=0, timeout=30)
        with pytest.raises(openai.AuthenticationError) as e:
            wrong.models.list()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            wrong.completions.create(model=MODEL, prompt="hi", max_tokens=1)
        right = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=30)
        assert right.models.list().data[0].id == MODEL
        assert right.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens >= 1
        # no header at all, and /health stays open
        r = httpx.get(f"{url}/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}
        # the key is checked before the body is read: an unauthenticated malformed body is still a 401
        r = httpx.post(f"{url}/v1/completions", content=b"{nope", headers={"Authorization": "Bearer sk-wrong"})
        assert r.status_code == 401


# ---- disconnects ---------------------------------------------------------------------------------------------------
def test_stream_disconnect_aborts_the_request(engine, server):
    aborted = engine.engine.stats().get("requests_abort", 0)
    body = {"model": MODEL, "prompt": "Tell me a long story", "max_tokens": 900, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{server}/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [line for line, _ in zip(lines, range(4))]
            assert got[0].startswith("data: ")
            assert engine.engine.stats()["running"] == 1
    # closing the connection closed the event generator, which aborted the request in the engine
    wait_for(lambda: engine.engine.stats().get("requests_abort", 0) == aborted + 1, timeout=10)
    assert_idle(engine)


def test_non_stream_disconnect_aborts_the_request(engine, server):
    aborted = engine.engine.stats().get("requests_abort", 0)
    body = {"model": MODEL, "prompt": "Tell me a long story", "max_tokens": 900, "temperature": 0,
            "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
    wait_for(lambda: engine.engine.stats().get("requests_abort", 0) == aborted + 1, timeout=10)
    assert_idle(engine)


# ---- error table ---------------------------------------------------------------------------------------------------
C, CHAT = "/v1/completions", "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]


def comp(**kw):
    return {"model": MODEL, "prompt": "hello", "max_tokens": 2, **kw}


def chat(**kw):
    return {"model": MODEL, "messages": USER, "max_tokens": 2, **kw}


ERROR_CASES = [
    # (id, path, body (dict, or raw bytes), status, param (None: the message is checked for `field` instead), field)
    ("malformed-json", C, b'{"model": "m1serve-tiny", "prompt": ', 400, None, "JSON"),
    ("not-an-object", C, b"[1, 2, 3]", 400, None, "JSON object"),
    ("wrong-type-max-tokens", C, comp(max_tokens="10"), 400, "max_tokens", "max_tokens"),
    ("wrong-type-stream", CHAT, chat(stream="yes"), 400, "stream", "stream"),
    ("wrong-type-temperature", C, comp(temperature="hot"), 400, "temperature", "temperature"),
    ("wrong-type-messages", CHAT, chat(messages="hi"), 400, "messages", "messages"),
    ("wrong-type-prompt", C, comp(prompt={"text": "hi"}), 400, "prompt", "prompt"),
    ("missing-model", C, {"prompt": "hi"}, 400, "model", "model"),
    ("missing-prompt", C, {"model": MODEL}, 400, "prompt", "prompt"),
    ("missing-messages", CHAT, {"model": MODEL}, 400, "messages", "messages"),
    ("unknown-model", C, comp(model="gpt-4"), 404, "model", "gpt-4"),
    ("unknown-model-chat", CHAT, chat(model="gpt-4"), 404, "model", "gpt-4"),
    ("temperature-range", C, comp(temperature=-1), 400, "temperature", "temperature"),
    ("top-p-range", CHAT, chat(top_p=0), 400, "top_p", "top_p"),
    ("top-k-range", C, comp(top_k=-5), 400, "top_k", "top_k"),
    ("seed-range", C, comp(seed=-1), 400, "seed", "seed"),
    ("logprobs-range", C, comp(logprobs=21), 400, "logprobs", "logprobs"),
    ("top-logprobs-range", CHAT, chat(logprobs=True, top_logprobs=21), 400, "top_logprobs", "top_logprobs"),
    ("top-logprobs-without-logprobs", CHAT, chat(top_logprobs=2), 400, "top_logprobs", "top_logprobs"),
    ("min-tokens-range", C, comp(min_tokens=5), 400, "min_tokens", "min_tokens"),
    ("empty-stop", C, comp(stop=[""]), 400, "stop", "stop"),
    ("max-tokens-zero", C, comp(max_tokens=0), 400, "max_tokens", "max_tokens"),
    ("max-tokens-beyond-context", C, comp(max_tokens=5000), 400, "max_tokens", "context length"),
    ("max-completion-tokens-beyond-context", CHAT, chat(max_completion_tokens=5000), 400, "max_tokens",
     "context length"),
    ("prompt-fills-context", C, {"model": MODEL, "prompt": [5] * 1024}, 400, "prompt", "context length"),
    ("n-2", C, comp(n=2), 400, "n", "n="),
    ("n-2-chat", CHAT, chat(n=2), 400, "n", "n="),
    ("best-of", C, comp(best_of=3), 400, "best_of", "best_of"),
    ("echo", C, comp(echo=True), 400, "echo", "echo"),
    ("presence-penalty", C, comp(presence_penalty=0.5), 400, "presence_penalty", "presence_penalty"),
    ("frequency-penalty", CHAT, chat(frequency_penalty=1), 400, "frequency_penalty", "frequency_penalty"),
    ("logit-bias", CHAT, chat(logit_bias={"5": 10}), 400, "logit_bias", "logit_bias"),
    ("stream-options-without-stream", C, comp(stream_options={"include_usage": True}), 400, "stream_options",
     "stream_options"),
    ("response-format", CHAT, chat(response_format={"type": "xml"}), 400, "response_format.type",
     "response_format"),
    ("empty-messages", CHAT, chat(messages=[]), 400, "messages", "messages"),
    ("invalid-role", CHAT, chat(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages[0].role", "role"),
    ("missing-content", CHAT, chat(messages=[{"role": "user"}]), 400, "messages[0].content", "content"),
    ("image-part", CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     400, "messages[0].content", "only text"),
    ("bad-tool-call", CHAT, chat(messages=[{"role": "assistant", "content": "", "tool_calls": [{"id": "x"}]}]),
     400, "messages", "tool call"),
    ("prompt-token-out-of-vocab", C, comp(prompt=[1, 2, 99999]), 400, "prompt", "vocabulary"),
    ("prompt-token-negative", C, comp(prompt=[[1, -2]]), 400, "prompt", "vocabulary"),
    ("prompt-batch", C, comp(prompt=["a", "b"]), 400, "prompt", "batches"),
    ("prompt-batch-ids", C, comp(prompt=[[1, 2], [3]]), 400, "prompt", "batches"),
    ("empty-prompt", C, comp(prompt=""), 400, "prompt", "empty"),
    ("bool-token-ids", C, comp(prompt=[True, False]), 400, "prompt", "prompt"),
]


@pytest.mark.anyio
@pytest.mark.parametrize("path, body, status, param, field", [c[1:] for c in ERROR_CASES],
                         ids=[c[0] for c in ERROR_CASES])
async def test_errors(app, path, body, status, param, field):
    async with asgi_client(app) as http:
        if isinstance(body, bytes):
            r = await http.post(path, content=body, headers={"Content-Type": "application/json"})
        else:
            r = await http.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert field in error["message"]


@pytest.mark.anyio
async def test_unknown_route_wrong_method_and_unknown_fields(app):
    async with asgi_client(app) as http:
        r = await http.get("/v1/nothing-here")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        r = await http.get("/v1/chat/completions")
        assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
        assert r.headers["allow"] == "POST"
        r = await http.post(C, json=comp(unknown_field={"x": 1}, user="someone", repetition_penalty=1.0))
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.anyio
async def test_body_size_limit(engine):
    app = create_app(engine, max_body_bytes=1024)
    big = comp(prompt="x" * 2000)
    async with asgi_client(app) as http:
        r = await http.post(C, json=big)  # Content-Length says it all
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        async def chunked():  # no Content-Length: counted while reading
            data = json.dumps(big).encode()
            for i in range(0, len(data), 256):
                yield data[i:i + 256]

        r = await http.post(C, content=chunked(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "1024" in r.json()["error"]["message"]
        assert (await http.post(C, json=comp())).status_code == 200


# ---- engine failures (a stub in front of the real engine) ----------------------------------------------------------
class FailingEngine:
    """The real engine's tokenizer and limits, with a failure injected at submit or at the end of generation."""

    def __init__(self, real: AsyncEngine, raise_exc: Exception | None = None, finish: str | None = None,
                 healthy: bool = True):
        self.real, self.raise_exc, self.finish, self.healthy = real, raise_exc, finish, healthy
        self.tokenizer, self.model_name, self.max_model_len = real.tokenizer, real.model_name, real.max_model_len
        self.max_tokens_limit = real.max_tokens_limit

    async def stream(self, prompt, params, request_id=None):
        if self.raise_exc is not None:
            raise self.raise_exc
        async for out in self.real.stream(prompt, params, request_id):
            if out.finished and self.finish:
                out.finish_reason, out.error = self.finish, "internal error: RuntimeError: secret detail"
            yield out

    async def generate(self, prompt, params, request_id=None):
        merged = None
        async for out in self.stream(prompt, params, request_id):
            merged = out
        return merged


@pytest.mark.anyio
@pytest.mark.parametrize("exc, status, code", [
    (QueueFull("300 requests are queued"), 429, "queue_full"),
    (EngineUnavailable("the engine is shutting down"), 503, "engine_unavailable"),
    (RuntimeError("secret internal detail"), 500, "internal_error"),
])
@pytest.mark.parametrize("stream", [False, True])
async def test_submit_failures_map_to_status(engine, exc, status, code, stream):
    app = create_app(FailingEngine(engine, raise_exc=exc))
    async with asgi_client(app) as http:
        r = await http.post(C, json=comp(stream=stream))
    assert r.status_code == status and r.json()["error"]["code"] == code
    assert "secret" not in r.text and "Traceback" not in r.text
    if status == 429:
        assert r.headers["retry-after"] == "1"


@pytest.mark.anyio
async def test_generation_failure(engine):
    app = create_app(FailingEngine(engine, finish="error"))
    async with asgi_client(app) as http:
        r = await http.post(CHAT, json=chat())
        assert r.status_code == 503 and r.json()["error"]["code"] == "generation_failed"
        assert "secret" not in r.text
        r = await http.post(CHAT, json=chat(stream=True, max_tokens=4))
        assert r.status_code == 200
    payloads = sse_payloads(r.text)
    assert payloads[-2]["error"]["code"] == "generation_failed" and payloads[-1] == "[DONE]"
    assert all("error" not in p for p in payloads[:-2])
    assert_idle(engine)


def test_client_sees_failures(engine):
    with serve(create_app(FailingEngine(engine, finish="error"))) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert e.value.status_code == 503
        stream = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, stream=True)
        with pytest.raises(openai.APIError, match="Generation failed"):  # the error event mid-stream
            list(stream)
    with serve(create_app(FailingEngine(engine, raise_exc=QueueFull("full")))) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, stream=True)
    assert_idle(engine)


@pytest.mark.anyio
async def test_health(engine, app):
    async with asgi_client(app) as http:
        r = await http.get("/health")
        assert r.status_code == 200 and r.json() == {"status": "ok"}
    async with asgi_client(create_app(FailingEngine(engine, healthy=False), api_key=API_KEY)) as http:
        r = await http.get("/health")
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unhealthy"


# ---- response content ----------------------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_sse_framing_and_deltas(engine, app):
    ref = reference(engine, "Hello there", max_tokens=6, ignore_eos=True)
    async with asgi_client(app) as http:
        r = await http.post(C, json=comp(prompt="Hello there", max_tokens=6, temperature=0, ignore_eos=True,
                                         stream=True))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    payloads = sse_payloads(r.text)
    chunks = payloads[:-1]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == ref.text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and "usage" not in chunks[-1]


@pytest.mark.anyio
async def test_usage_and_eos(engine, app):
    prompt = "Inference servers batch requests"
    async with asgi_client(app) as http:
        body = (await http.post(C, json=comp(prompt=prompt, max_tokens=5, ignore_eos=True))).json()
        assert body["usage"] == {"prompt_tokens": len(engine.tokenizer.encode(prompt)), "completion_tokens": 5,
                                 "total_tokens": len(engine.tokenizer.encode(prompt)) + 5}
        # eos as an extra stop token: the answer stops at it with finish_reason "stop"
        free = reference(engine, prompt, max_tokens=6, ignore_eos=True)
        body = (await http.post(C, json=comp(prompt=prompt, max_tokens=6, temperature=0, ignore_eos=True,
                                             stop_token_ids=[free.token_ids[2]], return_token_ids=True))).json()
        first = free.token_ids.index(free.token_ids[2])
        choice = body["choices"][0]
        assert choice["finish_reason"] == "stop" and choice["token_ids"] == free.token_ids[:first + 1]
        assert body["usage"]["completion_tokens"] == first + 1


@pytest.mark.anyio
async def test_completion_logprobs(engine, app):
    async with asgi_client(app) as http:
        body = (await http.post(C, json=comp(prompt="The weather", max_tokens=6, temperature=0, logprobs=3,
                                             ignore_eos=True, return_token_ids=True))).json()
    choice = body["choices"][0]
    lp = choice["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 6
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        # the chosen token plus 3 alternatives, one entry per distinct text (partial characters all read "\ufffd")
        assert 1 <= len(top) <= 4 and token in top and logprob <= 0
        assert logprob == pytest.approx(max(top.values()))  # greedy: the chosen token is the most likely
    offsets = lp["text_offset"]
    assert offsets[0] == 0 and all(b - a == len(t) for a, b, t in zip(offsets, offsets[1:], lp["tokens"]))


@pytest.mark.anyio
async def test_chat_logprobs(engine, app):
    async with asgi_client(app) as http:
        body = (await http.post(CHAT, json=chat(max_tokens=6, temperature=0, logprobs=True, top_logprobs=2,
                                                ignore_eos=True, return_token_ids=True))).json()
        plain = (await http.post(CHAT, json=chat(max_tokens=2, logprobs=True))).json()
        none = (await http.post(CHAT, json=chat(max_tokens=2))).json()
    choice = body["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == len(choice["token_ids"]) == 6
    for entry, token_id in zip(content, choice["token_ids"]):
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"} and len(entry["top_logprobs"]) == 2
        assert entry["logprob"] == pytest.approx(entry["top_logprobs"][0]["logprob"])  # greedy: the best one
        assert entry["logprob"] >= entry["top_logprobs"][1]["logprob"]
        assert entry["top_logprobs"][0]["bytes"] == entry["bytes"]
        assert bytes(entry["bytes"]).decode("utf-8", "replace") == entry["token"]
    assert all(e["top_logprobs"] == [] for e in plain["choices"][0]["logprobs"]["content"])
    assert none["choices"][0]["logprobs"] is None


@pytest.mark.anyio
async def test_chat_logprob_bytes_rebuild_the_text(engine, app):
    """Byte-level tokens can split a character; their bytes joined are the exact UTF-8 of the text."""
    async with asgi_client(app) as http:
        body = (await http.post(CHAT, json=chat(max_tokens=12, temperature=0, logprobs=True, ignore_eos=True,
                                                return_token_ids=True))).json()
    choice = body["choices"][0]
    special = {engine.tokenizer.token_to_id(t) for t in ("<begin_of_document>", "<beginning_of_sentence>",
                                                          "<end_of_sentence>", "<end_of_document>")}
    raw = b"".join(bytes(e["bytes"]) for e, t in zip(choice["logprobs"]["content"], choice["token_ids"])
                   if t not in special)
    expected = engine.tokenizer.decode([t for t in choice["token_ids"] if t not in special])
    assert raw.decode("utf-8", "replace") == expected


@pytest.mark.anyio
async def test_stop_strings(engine, app):
    ids = random_ids(10, 512, seed=7)
    free = reference(engine, ids, max_tokens=16, ignore_eos=True).text
    needle = next(free[i:i + 2] for i in range(len(free) // 3, len(free) - 2)
                  if free[i:i + 2].strip() and "\ufffd" not in free[i:i + 2])
    expected = free[:free.index(needle)]
    async with asgi_client(app) as http:
        body = (await http.post(C, json=comp(prompt=ids, max_tokens=16, temperature=0, ignore_eos=True,
                                             stop=needle))).json()
        assert body["choices"][0]["text"] == expected and body["choices"][0]["finish_reason"] == "stop"
        r = await http.post(C, json=comp(prompt=ids, max_tokens=16, temperature=0, ignore_eos=True,
                                         stop=["zzzz-never", needle], stream=True))
    chunks = sse_payloads(r.text)[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.anyio
async def test_chat_content_parts_developer_role_and_tools(engine, app):
    tool = {"name": "get_weather", "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    messages = [{"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
                {"role": "user", "content": "Weather in Paris?"}]
    expected = engine.tokenizer.encode(chat_prompt(engine, [{"role": "system", "content": "Be brief."},
                                                            messages[1]], [tool]))
    async with asgi_client(app) as http:
        body = (await http.post(CHAT, json=chat(messages=messages, tools=[{"type": "function", "function": tool}],
                                                tool_choice="auto", return_token_ids=True))).json()
    assert body["prompt_token_ids"] == expected
    assert body["choices"][0]["message"]["role"] == "assistant"


def test_default_max_tokens_is_the_rest_of_the_context():
    req = CompletionRequest.model_validate({"model": MODEL, "prompt": "hi"})
    assert req.to_sampling_params(10, 1024).max_tokens == 1014
    req = ChatCompletionRequest.model_validate({"model": MODEL, "messages": USER, "max_tokens": 7,
                                                "max_completion_tokens": 5, "top_k": 0, "stop": "x"})
    params = req.to_sampling_params(10, 1024)
    assert (params.max_tokens, params.top_k, params.stop, params.temperature) == (5, -1, ["x"], 1.0)
    assert req.model_copy(update={"max_completion_tokens": None}).to_sampling_params(10, 1024).max_tokens == 7
    # explicit nulls mean "default"
    req = CompletionRequest.model_validate({"model": MODEL, "prompt": "hi", "temperature": None, "n": None,
                                            "stop": None, "logprobs": None, "stream": None})
    req.check()
    assert req.to_sampling_params(4, 1024).temperature == 1.0


def test_concurrent_streams_through_the_client(engine, client):
    """Several streams at once share the engine (continuous batching) and each matches its own greedy result."""
    prompts = [random_ids(6, 512, seed=s) for s in range(4)]
    refs = [reference(engine, p, max_tokens=6, ignore_eos=True) for p in prompts]
    results = [None] * len(prompts)

    def run(i):
        stream = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=6, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True, "return_token_ids": True})
        results[i] = sum((c.choices[0].model_extra["token_ids"] for c in stream), [])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == [r.token_ids for r in refs]
    assert_idle(engine)
