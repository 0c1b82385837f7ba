"""The M1Serve gRPC API: a real grpc.aio server (own thread + event loop) over the tiny-model engine, a sync client
built from the shipped modules; plus the transport-independent handlers driven directly with a Ray-style context."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import grpc
import pytest

from cluster.api import m1serve_pb2, m1serve_pb2_grpc
from cluster.api.grpc_service import INTERNAL_DETAILS, GrpcError, M1ServeServicer, generate, generate_stream
from cluster.engine.async_engine import AsyncEngine
from cluster.engine.engine import Engine, EngineConfig, EngineUnavailable, QueueFull
from cluster.engine.sampling import SamplingParams
from cluster.engine.sequence import RequestOutput

from conftest import random_ids
from engine_helpers import wait_for

pytestmark = pytest.mark.usefixtures("single_thread")
MODEL = "m1serve-tiny"
TIMEOUT = 30


class ServerThread:
    """An asyncio loop in a daemon thread hosting grpc.aio servers."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.servers = []
        self.thread = threading.Thread(target=self.loop.run_forever, name="grpc-test-loop", daemon=True)
        self.thread.start()

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(TIMEOUT)

    def serve(self, servicer) -> int:
        async def start():
            server = grpc.aio.server()
            m1serve_pb2_grpc.add_M1ServeServicer_to_server(servicer, server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            self.servers.append(server)
            return port

        return self.call(start())

    def close(self):
        for server in self.servers:
            self.call(server.stop(None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)
        self.loop.close()


@pytest.fixture(scope="module")
def engine(tiny_model):
    with Engine(EngineConfig(model=str(tiny_model), max_num_seqs=8, max_model_len=1024)) as e:
        yield e


@pytest.fixture(scope="module")
def server_thread():
    st = ServerThread()
    yield st
    st.close()


def _stub(port):
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return channel, m1serve_pb2_grpc.M1ServeStub(channel)


@pytest.fixture(scope="module")
def stub(engine, server_thread):
    channel, stub = _stub(server_thread.serve(M1ServeServicer(AsyncEngine(engine, MODEL))))
    yield stub
    channel.close()


def request(prompt, **kw):
    if isinstance(prompt, str):
        return m1serve_pb2.GenerateRequest(text=prompt, **kw)
    return m1serve_pb2.GenerateRequest(prompt_token_ids=m1serve_pb2.TokenIds(ids=prompt), **kw)


PROMPTS = {"text": "Hello there, tiny model", "token_ids": random_ids(20, 512, 11)}
GREEDY = dict(max_tokens=12, temperature=0.0, ignore_eos=True)


def idle(engine):
    s = engine.stats()
    return s["running"] == 0 and s["waiting"] == 0 and s["slots_used"] == 0 and s["kv_blocks_used"] == 0


# ---- success paths -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(PROMPTS))
def test_unary_and_stream_match_engine_generate(engine, stub, kind):
    prompt = PROMPTS[kind]
    ref = engine.generate(prompt, SamplingParams(**GREEDY))
    prompt_ids = engine.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
    assert ref.prompt_token_ids == prompt_ids and len(ref.token_ids) == 12

    unary = stub.Generate(request(prompt, model=MODEL, request_id="abc", **GREEDY), timeout=TIMEOUT)
    assert list(unary.token_ids) == ref.token_ids and unary.text == ref.text
    assert list(unary.prompt_token_ids) == prompt_ids and unary.finish_reason == "length"
    assert (unary.usage.prompt_tokens, unary.usage.completion_tokens, unary.usage.total_tokens) == \
        (len(prompt_ids), 12, len(prompt_ids) + 12)
    assert unary.request_id == "abc" and not unary.logprobs

    messages = list(stub.GenerateStream(request(prompt, **GREEDY), timeout=TIMEOUT))
    assert len(messages) >= 2
    assert [t for m in messages for t in m.token_ids] == ref.token_ids
    assert "".join(m.text for m in messages) == unary.text
    assert list(messages[0].prompt_token_ids) == prompt_ids
    assert all(not m.prompt_token_ids for m in messages[1:])
    *body, last = messages
    assert all(not m.finish_reason and not m.HasField("usage") for m in body)
    assert last.finish_reason == "length" and last.usage == unary.usage
    assert len({m.request_id for m in messages}) == 1 and messages[0].request_id
    wait_for(lambda: idle(engine))


def test_defaults_stop_strings_and_logprobs(engine, stub):
    prompt = PROMPTS["token_ids"]
    # unset optional fields take SamplingParams' defaults (16 tokens; ignore_eos off, so EOS may end it early)
    out = stub.Generate(request(prompt, temperature=0.0), timeout=TIMEOUT)
    ref = engine.generate(prompt, SamplingParams(temperature=0.0))
    assert list(out.token_ids) == ref.token_ids and out.finish_reason == ref.finish_reason
    # stop token ids
    ref = engine.generate(prompt, SamplingParams(**GREEDY))
    stop_tok = ref.token_ids[3]
    out = stub.Generate(request(prompt, stop_token_ids=[stop_tok], **GREEDY), timeout=TIMEOUT)
    assert out.finish_reason == "stop" and list(out.token_ids) == ref.token_ids[: ref.token_ids.index(stop_tok) + 1]
    # logprobs: unary and streamed entries equal the engine's
    ref = engine.generate(prompt, SamplingParams(logprobs=2, **GREEDY))
    for entries in (stub.Generate(request(prompt, logprobs=2, **GREEDY), timeout=TIMEOUT).logprobs,
                    [e for m in stub.GenerateStream(request(prompt, logprobs=2, **GREEDY), timeout=TIMEOUT)
                     for e in m.logprobs]):
        assert [e.token_id for e in entries] == ref.token_ids
        for e, r in zip(entries, ref.logprobs):
            assert e.logprob == pytest.approx(r.logprob, abs=1e-5)
            assert [(t.token_id, pytest.approx(t.logprob, abs=1e-5)) for t in e.top] == r.top


# ---- errors --------------------------------------------------------------------------------------------------------
BAD_REQUESTS = {
    "max_tokens_0": (request("hi", max_tokens=0), "max_tokens"),
    "temperature_neg": (request("hi", temperature=-1), "temperature"),
    "top_p_0": (request("hi", top_p=0), "top_p"),
    "seed_neg": (request("hi", seed=-3), "seed"),
    "stop_token_neg": (request("hi", stop_token_ids=[-1]), "stop_token_ids"),
    "empty_text": (request(""), "prompt"),
    "empty_ids": (request([]), "prompt"),
    "no_prompt": (m1serve_pb2.GenerateRequest(max_tokens=3), "prompt"),
    "id_out_of_vocab": (request([1, 99999]), "prompt"),
    "too_long_with_max_tokens": (request(random_ids(1020, 512, 1), max_tokens=10), "max_tokens"),
    "prompt_too_long": (request(random_ids(1030, 512, 1), max_tokens=10), "prompt"),
    "model_mismatch": (request("hi", model="gpt-4"), "model"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
def test_invalid_requests_are_invalid_argument_naming_the_field(stub, name, streaming):
    req, field = BAD_REQUESTS[name]
    with pytest.raises(grpc.RpcError) as e:
        if streaming:
            list(stub.GenerateStream(req, timeout=TIMEOUT))
        else:
            stub.Generate(req, timeout=TIMEOUT)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(f"{field}: "), e.value.details()
    assert "Traceback" not in e.value.details()


class FakeEngine:
    """AsyncEngine stand-in: `fail` is raised at the first iteration, or the outputs are streamed as given."""

    model_name = MODEL

    def __init__(self, fail: Exception | None = None, outputs: list[RequestOutput] | None = None):
        self.fail, self.outputs = fail, outputs or []

    async def stream(self, prompt, params, request_id=None):
        if self.fail is not None:
            raise self.fail
        for out in self.outputs:
            await asyncio.sleep(0)
            yield dataclasses.replace(out)  # AsyncEngine.generate merges into the first output in place

    async def generate(self, prompt, params, request_id=None):
        return await AsyncEngine.generate(self, prompt, params, request_id)


def _out(token_ids, text, finished=False, reason=None, error=None, n=0):
    return RequestOutput("r", token_ids, text, finished, reason, error, [], [1, 2] if n == 0 else None, 2, n)


PARTIAL_THEN_ERROR = [_out([5], "a"), _out([6], "b", n=2),
                      _out([], "", True, "error", "expert shards are unavailable: shard 1 died", n=2)]
ENGINE_FAILURES = {
    "queue_full": (FakeEngine(QueueFull("300 requests are queued")), grpc.StatusCode.RESOURCE_EXHAUSTED, "queued"),
    "unavailable": (FakeEngine(EngineUnavailable("the engine is shutting down")), grpc.StatusCode.UNAVAILABLE,
                    "shutting down"),
    "result_error": (FakeEngine(outputs=PARTIAL_THEN_ERROR), grpc.StatusCode.UNAVAILABLE, "shard 1 died"),
    "internal_error_result": (FakeEngine(outputs=[_out([], "", True, "error", "internal error: KeyError: 3")]),
                              grpc.StatusCode.UNAVAILABLE, "retry"),
    "bug": (FakeEngine(KeyError("secret internals")), grpc.StatusCode.INTERNAL, INTERNAL_DETAILS),
}


@pytest.fixture(scope="module")
def fake_stubs(server_thread):
    """One server per fake engine, all on the test loop thread."""
    channels, stubs = [], {}
    for name, (fake, _, _) in ENGINE_FAILURES.items():
        channel, stubs[name] = _stub(server_thread.serve(M1ServeServicer(fake)))
        channels.append(channel)
    yield stubs
    for c in channels:
        c.close()


@pytest.mark.parametrize("name", list(ENGINE_FAILURES))
def test_engine_failures_map_to_status_codes(fake_stubs, name, caplog):
    _, code, details = ENGINE_FAILURES[name]
    stub = fake_stubs[name]
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(request("hi"), timeout=TIMEOUT)
    assert e.value.code() == code and details in e.value.details()
    assert "secret" not in e.value.details() and "KeyError" not in e.value.details()
    received = []
    with pytest.raises(grpc.RpcError) as e:
        for m in stub.GenerateStream(request("hi"), timeout=TIMEOUT):
            received.append(m)
    assert e.value.code() == code and details in e.value.details()
    if name == "result_error":  # what was generated before the failure was delivered, then the status
        assert [list(m.token_ids) for m in received] == [[5], [6]]


class RayStyleContext:
    """The part of Ray Serve's RayServegRPCContext the handlers use."""

    def __init__(self):
        self.code, self.details = None, None

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details


def test_handlers_with_a_ray_style_context():
    async def run():
        ctx = RayStyleContext()
        resp = await generate(FakeEngine(QueueFull("full")), request("hi"), ctx)
        assert resp == m1serve_pb2.GenerateResponse() and ctx.code == grpc.StatusCode.RESOURCE_EXHAUSTED

        ctx = RayStyleContext()
        msgs = [m async for m in generate_stream(FakeEngine(outputs=PARTIAL_THEN_ERROR), request("hi"), ctx)]
        assert len(msgs) == 2 and ctx.code == grpc.StatusCode.UNAVAILABLE and "shard 1 died" in ctx.details

        ctx = RayStyleContext()
        ok = [_out([5], "a"), _out([6], "b", True, "length", n=2)]
        msgs = [m async for m in generate_stream(FakeEngine(outputs=ok), request("hi", request_id="q"), ctx)]
        assert ctx.code is None and [m.text for m in msgs] == ["a", "b"] and msgs[-1].usage.total_tokens == 4
        assert list(msgs[0].prompt_token_ids) == [1, 2] and all(m.request_id == "q" for m in msgs)

        ctx = RayStyleContext()
        await generate(FakeEngine(), request("hi", max_tokens=0), ctx)
        assert ctx.code == grpc.StatusCode.INVALID_ARGUMENT and ctx.details.startswith("max_tokens: ")

        with pytest.raises(GrpcError) as e:  # no context: the status is raised
            await generate(FakeEngine(), request("hi", model="other"), None)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.details.startswith("model: ")

    asyncio.run(run())


# ---- cancellation --------------------------------------------------------------------------------------------------
LONG = dict(max_tokens=1000, temperature=0.0, ignore_eos=True)


def test_cancelling_a_stream_aborts_the_request(engine, stub):
    wait_for(lambda: idle(engine))
    aborted = engine.stats().get("requests_abort", 0)
    call = stub.GenerateStream(request(PROMPTS["token_ids"], **LONG), timeout=TIMEOUT)
    for _ in range(3):
        next(call)
    assert engine.stats()["running"] == 1
    call.cancel()
    wait_for(lambda: idle(engine), timeout=10)
    assert engine.stats()["requests_abort"] == aborted + 1


def test_closing_the_handler_generator_aborts_the_request(engine):
    """What Ray Serve does when the gRPC client goes away: the stream generator is closed / the unary task
    cancelled."""
    aengine = AsyncEngine(engine, MODEL)

    async def run():
        agen = generate_stream(aengine, request(PROMPTS["text"], **LONG), RayStyleContext())
        for _ in range(3):
            await agen.__anext__()
        assert engine.stats()["running"] == 1
        await agen.aclose()
        while not idle(engine):
            await asyncio.sleep(0.02)

        task = asyncio.create_task(generate(aengine, request(PROMPTS["text"], **LONG), RayStyleContext()))
        while engine.stats()["running"] == 0:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        while not idle(engine):
            await asyncio.sleep(0.02)

    assert aborts_during(engine, run) == 2


def test_cancelling_the_router_stream_at_its_yield_aborts_at_once(engine, monkeypatch):
    """Ray Serve cancels a replica's stream by throwing CancelledError into the Router's generator where it waits:
    at its yield when user code shares Serve's loop. The engine request must be aborted before the throw returns,
    not when the inner generator is garbage-collected (which a held traceback delays)."""
    from cluster.deployments import Router

    aborts = []

    def abort(request_id):
        aborts.append(request_id)
        Engine.abort(engine, request_id)

    monkeypatch.setattr(engine, "abort", abort)
    router = dataclasses.make_dataclass("RouterState", ["async_engine", "metrics", "api_key"])(
        AsyncEngine(engine, MODEL), None, None)

    async def run():
        agen = Router.GenerateStream(router, request(PROMPTS["text"], **LONG), RayStyleContext())
        for _ in range(3):
            await agen.__anext__()
        with pytest.raises(asyncio.CancelledError) as held:  # keeps the generators' frames alive
            await agen.athrow(asyncio.CancelledError())
        assert len(aborts) == 1, held
        while not idle(engine):
            await asyncio.sleep(0.02)

    assert aborts_during(engine, run) == 1


def aborts_during(engine, run) -> int:
    """Requests the engine aborted while the coroutine function `run` ran (started with the engine idle)."""
    wait_for(lambda: idle(engine))
    aborted = engine.stats().get("requests_abort", 0)
    asyncio.run(asyncio.wait_for(run(), TIMEOUT))
    return engine.stats()["requests_abort"] - aborted


def test_generated_modules_are_importable_as_package_modules():
    """The Ray Serve proxy imports `cluster.api.m1serve_pb2_grpc.add_M1ServeServicer_to_server`; the _pb2_grpc
    module must import its _pb2 through the package, not as a top-level module."""
    import importlib
    import inspect

    mod = importlib.import_module("cluster.api.m1serve_pb2_grpc")
    assert callable(mod.add_M1ServeServicer_to_server)
    assert "from cluster.api import m1serve_pb2" in inspect.getsource(mod)
    assert m1serve_pb2.DESCRIPTOR.package == "m1serve.v1"
    assert set(m1serve_pb2.DESCRIPTOR.services_by_name["M1Serve"].methods_by_name) == {"Generate", "GenerateStream"}
