"""Tool calling, reasoning and structured output end to end: the official `openai` client against the app under
uvicorn (and, marked slow, against a real `m1serve serve` with 2 expert shards), the gRPC service, and the 400s for
bad tool requests. The tiny random model only produces valid tool calls / JSON because guided decoding forces it."""

from __future__ import annotations

import json
import re

import grpc
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from cluster.api import m1serve_pb2 as pb
from cluster.api import m1serve_pb2_grpc
from cluster.api.grpc_service import M1ServeServicer
from cluster.api.openai_api import create_app
from cluster.engine.async_engine import AsyncEngine
from cluster.engine.engine import Engine, EngineConfig

from test_grpc_api import ServerThread, _stub
from test_openai_api import asgi_client, serve, sse_payloads
from serve_helpers import running_server

MODEL = "m1serve-tiny"
CHAT = "/v1/chat/completions"
WEATHER_PARAMS = {"type": "object",
                  "properties": {"location": {"type": "string", "description": "City name"},
                                 "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                  "required": ["location", "unit"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city",
                                            "parameters": WEATHER_PARAMS}}
TIME_PARAMS = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 20}},
               "required": ["timezone"]}
TIME = {"type": "function", "function": {"name": "get_current_time", "description": "Current time",
                                         "parameters": TIME_PARAMS}}
SCHEMAS = {"get_weather": WEATHER_PARAMS, "get_current_time": TIME_PARAMS}
USER = [{"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What's the weather like in Paris today?"}]
PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0},
                         "languages": {"type": "array", "items": {"type": "string", "enum": ["en", "fr", "zh"]}}},
          "required": ["name", "age", "languages"], "additionalProperties": False}
SAMPLE = dict(temperature=1.0, seed=7, max_tokens=400)


@pytest.fixture(scope="module")
def engine(tiny_model):
    e = Engine(EngineConfig(model=str(tiny_model), max_num_seqs=8, max_model_len=2048))
    yield AsyncEngine(e, MODEL)
    e.shutdown()


@pytest.fixture(scope="module")
def app(engine):
    return create_app(engine)


@pytest.fixture(scope="module")
def client(app):
    with serve(app) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def anyio_backend():
    return "asyncio"


def validate_calls(tool_calls, names=None):
    assert tool_calls
    for call in tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert names is None or call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def prompt_ids(engine, messages, tools=None) -> list[int]:
    tok = engine.tokenizer
    return tok.encode(tok.apply_chat_template(messages, tools))


# ---- the tool-calling flow with the official client ------------------------------------------------------------------
def tool_flow(client, engine=None, model=MODEL):
    """Forced call -> tool_calls whose arguments validate -> follow-up with the call and its result -> an answer."""
    first = client.chat.completions.create(
        model=model, messages=USER, tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, **SAMPLE)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None and len(choice.message.tool_calls) == 1
    validate_calls(choice.message.tool_calls, {"get_weather"})
    call = choice.message.tool_calls[0]
    if engine is not None:  # the prompt carried both tools
        tools = [WEATHER["function"], TIME["function"]]
        assert first.usage.prompt_tokens == len(prompt_ids(engine, USER, tools))

    follow_up = USER + [choice.message.model_dump(exclude_none=True),
                        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 21})}]
    second = client.chat.completions.create(model=model, messages=follow_up, tools=[WEATHER, TIME], max_tokens=16,
                                            temperature=0, extra_body={"ignore_eos": True})
    answer = second.choices[0]
    assert answer.finish_reason == "length" and answer.message.role == "assistant"
    assert answer.message.tool_calls is None and isinstance(answer.message.content, str)
    if engine is not None:  # the assistant call and the tool result went into the prompt (MiniMax layout)
        rendered = engine.tokenizer.apply_chat_template(follow_up, [WEATHER["function"], TIME["function"]])
        assert f'<tool_calls>\n{{"name": "get_weather", "arguments": {call.function.arguments}}}\n</tool_calls>' \
            in rendered
        assert "tool name: get_weather\ntool result: {\"temperature_c\": 21}" in rendered
        assert second.usage.prompt_tokens == len(engine.tokenizer.encode(rendered))
    return first, second


def structured_flow(client, model=MODEL):
    resp = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Describe a person."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}},
        **SAMPLE)
    assert resp.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(resp.choices[0].message.content), PERSON)
    return resp


def test_openai_client_tool_flow(engine, client):
    tool_flow(client, engine.engine)


def test_openai_client_required_tool_choice_stream_matches_unary(client):
    kw = dict(model=MODEL, messages=USER, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False,
              temperature=1.0, seed=3, max_tokens=400)
    unary = client.chat.completions.create(**kw).choices[0]
    validate_calls(unary.message.tool_calls)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    call_deltas = [t for d in deltas for t in (d.tool_calls or [])]
    assert len(call_deltas) == 1  # one whole call: index, id, type, name and all the arguments
    (d,) = call_deltas
    assert d.index == 0 and d.id.startswith("call_") and d.type == "function"
    assert (d.function.name, d.function.arguments) == (unary.message.tool_calls[0].function.name,
                                                       unary.message.tool_calls[0].function.arguments)
    assert not "".join(x.content or "" for x in deltas)  # nothing of the block leaks into content
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_openai_client_stream_helper_accumulates_tool_calls(client):
    with client.chat.completions.stream(model=MODEL, messages=USER, tools=[WEATHER], tool_choice="required",
                                        **SAMPLE) as stream:
        final = stream.get_final_completion()
    validate_calls(final.choices[0].message.tool_calls, {"get_weather"})
    assert final.choices[0].finish_reason == "tool_calls"


def test_openai_client_response_format(client):
    structured_flow(client)
    resp = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "JSON!"}],
                                          response_format={"type": "json_object"}, **SAMPLE)
    assert isinstance(json.loads(resp.choices[0].message.content), dict)

    class City(BaseModel):
        name: str = Field(max_length=15)
        population: int
        capital: bool

    parsed = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "A city?"}],
                                           response_format=City, **SAMPLE)
    assert isinstance(parsed.choices[0].message.parsed, City)


def test_tool_choice_none_renders_no_tools_and_parses_nothing(engine, client):
    resp = client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER], tool_choice="none",
                                          max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    assert resp.usage.prompt_tokens == len(prompt_ids(engine.engine, USER))
    assert resp.choices[0].message.tool_calls is None


# ---- auto tool choice: the parser on real engine output -------------------------------------------------------------
FORCED_TEXT = ('<think>\nThe user asks about Paris weather.\n</think>\n'
               '<tool_calls>\n{"name": "get_weather", "arguments": {"location": "Paris", "unit": "celsius"}}\n'
               '</tool_calls>')


@pytest.mark.anyio
async def test_auto_tool_choice_parses_reasoning_and_calls(app):
    """guided_regex makes the random model write a MiniMax tool call; tool_choice auto parses it."""
    body = {"model": MODEL, "messages": USER, "tools": [WEATHER], "max_tokens": 200,
            "guided_regex": re.escape(FORCED_TEXT)}
    async with asgi_client(app) as http:
        r = await http.post(CHAT, json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        msg = choice["message"]
        assert msg["content"] is None and msg["reasoning_content"] == "The user asks about Paris weather."
        (call,) = msg["tool_calls"]
        assert call["function"] == {"name": "get_weather", "arguments": '{"location": "Paris", "unit": "celsius"}'}

        raw = await http.post(CHAT, json={**body, "stream": True})
        events = sse_payloads(raw.text)[:-1]
        deltas = [e["choices"][0]["delta"] for e in events]
        reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
        assert reasoning == msg["reasoning_content"]
        assert sum(1 for d in deltas if d.get("reasoning_content")) > 3  # reasoning streams as it comes
        assert not "".join(d.get("content") or "" for d in deltas)
        calls = [t for d in deltas for t in d.get("tool_calls", [])]
        assert [c["function"] for c in calls] == [call["function"]] and calls[0]["index"] == 0
        assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"

        # with tool_choice "none" the same text stays content (reasoning is still split off)
        r = await http.post(CHAT, json={**body, "tool_choice": "none"})
        msg = r.json()["choices"][0]["message"]
        assert msg["content"].startswith("<tool_calls>") and "tool_calls" not in msg
        assert r.json()["choices"][0]["finish_reason"] == "stop"


# ---- 400s ----------------------------------------------------------------------------------------------------------
BAD = [
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
    ({"tools": ["get_weather"]}, "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": 1}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "wat"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"d": {"type": "string", "format": "no-such-format"}}}}}],
      "tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string",
                                                                                         "format": "nope"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"minimum": "0"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"response_format": {"type": "json_object"}, "tools": [WEATHER], "tool_choice": "required"}, "response_format"),
]


@pytest.mark.anyio
@pytest.mark.parametrize("extra, param", BAD, ids=[b[1] + f"-{i}" for i, b in enumerate(BAD)])
async def test_bad_tool_requests_are_400_naming_the_field(app, extra, param):
    async with asgi_client(app) as http:
        for stream in (False, True):
            r = await http.post(CHAT, json={"model": MODEL, "messages": USER, "max_tokens": 4, "stream": stream,
                                            **extra})
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["param"] == param and err["message"].startswith(param), err


# ---- gRPC ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def grpc_stub(engine):
    st = ServerThread()
    channel, stub = _stub(st.serve(M1ServeServicer(engine)))
    yield stub
    channel.close()
    st.close()


def grpc_messages(messages):
    out = []
    for m in messages:
        calls = [pb.ToolCall(id=c["id"], name=c["function"]["name"], arguments=c["function"]["arguments"])
                 for c in m.get("tool_calls", [])]
        out.append(pb.ChatMessage(role=m["role"], content=m.get("content") or "",
                                  tool_call_id=m.get("tool_call_id", ""), tool_calls=calls))
    return pb.ChatMessages(messages=out)


def grpc_tool_flow(stub, engine=None):
    req = pb.GenerateRequest(messages=grpc_messages(USER), tools=[json.dumps(WEATHER), json.dumps(TIME["function"])],
                             tool_choice="get_current_time", temperature=1.0, seed=5, max_tokens=300)
    unary = stub.Generate(req, timeout=60)
    assert unary.finish_reason == "tool_calls" and unary.text == "" and len(unary.tool_calls) == 1
    call = unary.tool_calls[0]
    assert call.index == 0 and call.id.startswith("call_") and call.name == "get_current_time"
    jsonschema.validate(json.loads(call.arguments), TIME_PARAMS)
    parts = list(stub.GenerateStream(req, timeout=60))
    streamed = [c for p in parts for c in p.tool_calls]
    assert [(c.name, c.arguments) for c in streamed] == [(call.name, call.arguments)]
    assert parts[-1].finish_reason == "tool_calls" and not "".join(p.text for p in parts)
    assert [t for p in parts for t in p.token_ids] == list(unary.token_ids)

    follow = USER + [{"role": "assistant", "tool_calls": [{"id": call.id, "function": {
        "name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "12:00"}]
    second = stub.Generate(pb.GenerateRequest(messages=grpc_messages(follow), tools=[json.dumps(WEATHER)],
                                              max_tokens=8, temperature=0.0, ignore_eos=True), timeout=60)
    assert second.finish_reason == "length" and not second.tool_calls
    if engine is not None:
        assert second.usage.prompt_tokens == len(prompt_ids(engine, follow, [WEATHER["function"]]))

    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    out = stub.Generate(pb.GenerateRequest(messages=grpc_messages(USER), response_format=json.dumps(fmt),
                                           temperature=1.0, seed=1, max_tokens=300), timeout=60)
    assert out.finish_reason == "stop"
    jsonschema.validate(json.loads(out.text), PERSON)


def test_grpc_forced_tool_call_follow_up_and_json_schema(engine, grpc_stub):
    grpc_tool_flow(grpc_stub, engine.engine)


def test_grpc_bad_tools_are_invalid_argument(grpc_stub):
    for req, field in [(pb.GenerateRequest(text="hi", tools=["{not json"]), "tools[0]"),
                       (pb.GenerateRequest(text="hi", tools=[json.dumps(WEATHER)], tool_choice="nope"), "tool_choice"),
                       (pb.GenerateRequest(text="hi", response_format='{"type": "xml"}'), "response_format.type"),
                       (pb.GenerateRequest(messages=pb.ChatMessages()), "messages")]:
        with pytest.raises(grpc.RpcError) as e:
            grpc_stub.Generate(req, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith(field), \
            e.value.details()


# ---- against a real `m1serve serve` (Ray Serve, 2 expert shards) ---------------------------------------------------
@pytest.mark.slow
def test_serve_tool_flow_json_schema_and_grpc(tiny_model, tmp_path):
    with running_server(tiny_model, tmp_path) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        tool_flow(client, model=server.model)
        structured_flow(client, model=server.model)
        with grpc.insecure_channel(server.grpc) as channel:
            grpc_tool_flow(m1serve_pb2_grpc.M1ServeStub(channel))
