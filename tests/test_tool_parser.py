"""cluster/api/tool_parser.py: MiniMax-M1 output -> reasoning_content / content / tool_calls, whole and streamed,
and the request side (tools, tool_choice, response_format validation)."""

from __future__ import annotations

import json
import random

import pytest

from cluster.api.tool_parser import (CALLS_OPEN, ParsedOutput, StreamParser, parse_calls_block, parse_output,
                                     response_format_spec, tool_setup)
from cluster.engine.sampling import InvalidRequest

NAMES = ["search_web", "get_weather", "get_current_time"]

# Outputs in the layout of MiniMax's function-call guide (docs/function_call_guide.md; model.md §7).
GUIDE_SEARCH = (
    "<think>\n"
    "The user wants the latest OpenAI and Gemini releases. I should search the web for both, in English and "
    "Chinese.\n"
    "</think>\n"
    "<tool_calls>\n"
    '{"name": "search_web", "arguments": {"query_tag": ["technology", "events"], '
    '"query_list": ["\\"OpenAI\\" \\"latest\\" \\"release\\""]}}\n'
    '{"name": "search_web", "arguments": {"query_tag": ["technology", "events"], '
    '"query_list": ["\\"Gemini\\" \\"latest\\" \\"release\\""]}}\n'
    "</tool_calls>"
)
WEATHER_WITH_TEXT = (
    "<think>\nShanghai weather: call get_weather with the city.\n</think>\n\n"
    "Let me check the weather in Shanghai for you.\n"
    "<tool_calls>\n"
    '{"name": "get_weather", "arguments": {"location": "上海", "unit": "celsius"}}\n'
    "</tool_calls>"
)
ANSWER_AFTER_TOOL = ("<think>\nThe tool says 22°C and sunny.\n</think>\n\n"
                     "It is 22°C and sunny in Shanghai today. 🌞")
PLAIN = "The capital of France is Paris."

SAMPLES = [
    GUIDE_SEARCH,
    WEATHER_WITH_TEXT,
    ANSWER_AFTER_TOOL,
    PLAIN,
    "",
    "  \n",
    "<think>",
    "<think>\nstill thinking about <tool_calls> and such",  # unclosed: reasoning so far
    "<think>a</think>",
    "<thin",
    "<think>x</thin",
    "  <think>\n\n</think>\n\n  answer  \n",
    "text < with <tool angle <tool_calls brackets >",
    # tool calls inside the reasoning are reasoning
    '<think>maybe <tool_calls>\n{"name": "get_weather", "arguments": {}}\n</tool_calls></think>fine',
    # unterminated block at the end: tolerated when well-formed
    '<tool_calls>\n{"name": "get_current_time", "arguments": {"timezone": "Asia/Shanghai"}}\n',
    # cut mid-object (max_tokens): content
    '<tool_calls>\n{"name": "get_weather", "arguments": {"location": "Par',
    # bad JSON, unknown tool, non-object arguments: content
    '<tool_calls>\n{"name": "get_weather", "arguments": {location: Paris}}\n</tool_calls>',
    '<tool_calls>\n{"name": "launch_rocket", "arguments": {}}\n</tool_calls>',
    '<tool_calls>\n{"name": "get_weather", "arguments": [1, 2]}\n</tool_calls>',
    "<tool_calls>\n</tool_calls>",
    "<tool_calls>",
    "<tool_calls",
    # one good line and one bad line: the whole block is content
    '<tool_calls>\n{"name": "get_weather", "arguments": {"location": "Paris"}}\nnot json\n</tool_calls>',
    # vLLM's repair of a duplicated closing brace; arguments as a JSON string; missing arguments
    '<tool_calls>\n{"name": "get_weather", "arguments": {"location": "Oslo"}}}\n</tool_calls>',
    '<tool_calls>\n{"name": "get_weather", "arguments": "{\\"location\\": \\"Rome\\"}"}\n</tool_calls>',
    '<tool_calls>\n{"name": "get_current_time"}\n</tool_calls>',
    # text after the block, two blocks, a malformed block between good ones
    'A <tool_calls>\n{"name": "get_current_time", "arguments": {}}\n</tool_calls>\n B',
    ('<tool_calls>\n{"name": "get_current_time", "arguments": {}}\n</tool_calls> mid <tool_calls>{bad}</tool_calls>'
     ' <tool_calls>{"name": "get_weather", "arguments": {"location": "</tool_calls"}}</tool_calls>end'),
    # pretty-printed call spanning lines, and a nested </think> in content
    '</think> no leading think\n<tool_calls>\n{\n  "name": "get_weather",\n  "arguments": {"location": "Lima"}\n}\n'
    "</tool_calls>",
]


def strip_ids(parsed: ParsedOutput) -> tuple:
    calls = [(c["index"], c["type"], c["function"]["name"], c["function"]["arguments"]) for c in parsed.tool_calls]
    for c in parsed.tool_calls:
        assert c["id"].startswith("call_") and len(c["id"]) > 10
    return parsed.content, parsed.reasoning_content, calls


def stream(text: str, cuts: list[int], **kw) -> tuple[ParsedOutput, list[dict]]:
    """Feeds text split at cuts; returns the parse built from the deltas alone, and the deltas."""
    parser = StreamParser(**kw)
    deltas, prev = [], 0
    for c in [*cuts, len(text)]:
        deltas.append(parser.feed(text[prev:c]))
        prev = c
    deltas.append(parser.finish())
    content = "".join(d.get("content", "") for d in deltas)
    reasoning = [d["reasoning_content"] for d in deltas if "reasoning_content" in d]
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    result = parser.result()
    assert (result.content or "") == content and "".join(reasoning) == (result.reasoning_content or "")
    assert strip_ids(result)[2] == strip_ids(ParsedOutput(None, None, calls))[2]
    for d in deltas:
        for key in ("content", "reasoning_content"):
            assert key not in d or d[key], d  # no empty strings
    return result, deltas


# ---- whole output --------------------------------------------------------------------------------------------------
def test_guide_layout_parallel_calls():
    p = parse_output(GUIDE_SEARCH, NAMES, parse_tools=True)
    assert p.content is None
    assert p.reasoning_content.startswith("The user wants") and p.reasoning_content.endswith("Chinese.")
    assert [c["function"]["name"] for c in p.tool_calls] == ["search_web", "search_web"]
    assert [c["index"] for c in p.tool_calls] == [0, 1]
    args = [json.loads(c["function"]["arguments"]) for c in p.tool_calls]
    assert args[0] == {"query_tag": ["technology", "events"], "query_list": ['"OpenAI" "latest" "release"']}
    assert len({c["id"] for c in p.tool_calls}) == 2
    assert p.message_tool_calls()[0].keys() == {"id", "type", "function"}


def test_text_before_the_call_and_unicode_arguments():
    p = parse_output(WEATHER_WITH_TEXT, NAMES, parse_tools=True)
    assert p.content == "Let me check the weather in Shanghai for you."
    assert p.reasoning_content == "Shanghai weather: call get_weather with the city."
    (call,) = p.tool_calls
    assert call["function"]["arguments"] == '{"location": "上海", "unit": "celsius"}'


def test_plain_answers_and_reasoning():
    p = parse_output(ANSWER_AFTER_TOOL, NAMES, parse_tools=True)
    assert (p.content, p.reasoning_content, p.tool_calls) == (
        "It is 22°C and sunny in Shanghai today. 🌞", "The tool says 22°C and sunny.", [])
    assert parse_output(PLAIN) == ParsedOutput(PLAIN, None, [])
    assert parse_output("") == ParsedOutput("", None, [])
    assert parse_output("<think>\nhmm, so far") == ParsedOutput(None, "hmm, so far", [])
    assert parse_output("  \n<think>a</think>\n\nb\n") == ParsedOutput("b\n", "a", [])
    assert parse_output("</think> no leading think") == ParsedOutput("</think> no leading think", None, [])
    assert parse_output("<think>a</think>b", parse_reasoning=False).content == "<think>a</think>b"


def test_no_tool_parsing_without_tools():
    text = WEATHER_WITH_TEXT
    p = parse_output(text, NAMES, parse_tools=False)
    assert p.tool_calls == [] and p.content.startswith("Let me check") and p.content.endswith("</tool_calls>")


@pytest.mark.parametrize("text", [
    '<tool_calls>\n{"name": "get_weather", "arguments": {location: Paris}}\n</tool_calls>',
    '<tool_calls>\n{"name": "launch_rocket", "arguments": {}}\n</tool_calls>',
    '<tool_calls>\n{"name": "get_weather", "arguments": {"location": "Par',
    '<tool_calls>\n{"name": "get_weather", "arguments": {"a": 1}}\n[1]\n</tool_calls>',
    '<tool_calls>\n{"name": "get_weather", "arguments": "not json"}\n</tool_calls>',
    '<tool_calls>\n{"name": 5, "arguments": {}}\n</tool_calls>',
    "<tool_calls>\n" + "[" * 5000 + "\n</tool_calls>",
    "<tool_calls>\n" + '{"a":' * 5000 + "\n</tool_calls>",
])
def test_malformed_blocks_degrade_to_content(text):
    p = parse_output(text, NAMES, parse_tools=True)
    assert p.tool_calls == [] and p.content == text and p.reasoning_content is None


def test_block_helpers():
    assert parse_calls_block('\n{"name": "get_weather", "arguments": {"x": 1}}}}\n', NAMES) == [
        ("get_weather", '{"x": 1}')]
    assert parse_calls_block('{"name": "anything", "parameters": {"x": 1}}', None) == [("anything", '{"x": 1}')]
    assert parse_calls_block("", NAMES) is None
    assert parse_calls_block("{}", NAMES) is None


def test_tool_calls_inside_think_are_reasoning():
    text = '<think>maybe <tool_calls>\n{"name": "get_weather", "arguments": {}}\n</tool_calls></think>fine'
    p = parse_output(text, NAMES, parse_tools=True)
    assert p.tool_calls == [] and p.content == "fine" and "<tool_calls>" in p.reasoning_content


# ---- streaming -----------------------------------------------------------------------------------------------------
def expected(text, kw):
    return strip_ids(parse_output(text, **kw))


MODES = [dict(tool_names=NAMES, parse_tools=True), dict(tool_names=None, parse_tools=False),
         dict(tool_names=NAMES, parse_tools=True, parse_reasoning=False)]


@pytest.mark.parametrize("mode", range(len(MODES)))
def test_stream_cut_at_every_boundary_matches_whole_parse(mode):
    kw = MODES[mode]
    for text in SAMPLES:
        want = expected(text, kw)
        assert strip_ids(stream(text, [], **kw)[0]) == want, text
        for cut in range(len(text) + 1):
            assert strip_ids(stream(text, [cut], **kw)[0]) == want, (text, cut)
        # one character at a time
        assert strip_ids(stream(text, list(range(1, len(text))), **kw)[0]) == want, text


def test_stream_random_chunkings_match_whole_parse():
    rng = random.Random(0)
    texts = SAMPLES + ["".join(rng.choice(SAMPLES[:4]) for _ in range(3)) for _ in range(20)]
    for kw in MODES:
        for text in texts:
            want = expected(text, kw)
            for _ in range(15):
                k = rng.randint(0, min(len(text), 25))
                cuts = sorted(rng.sample(range(len(text) + 1), k)) if text else []
                assert strip_ids(stream(text, cuts, **kw)[0]) == want, (text, cuts)


def test_stream_never_shows_tags_or_partial_blocks_as_content():
    for text in SAMPLES:
        for cuts in ([], list(range(1, len(text)))):
            result, deltas = stream(text, cuts, tool_names=NAMES, parse_tools=True)
            # a tag shown as content (a malformed block) comes whole, inside one delta
            joined, pos = "".join(d.get("content", "") for d in deltas), 0
            bounds = [pos := pos + len(d.get("content", "")) for d in deltas]
            start = joined.find(CALLS_OPEN)
            while start >= 0:
                assert not any(start < b < start + len(CALLS_OPEN) for b in bounds), (text, cuts)
                start = joined.find(CALLS_OPEN, start + 1)
            if result.tool_calls and "{bad}" not in text:
                assert "<tool_calls" not in joined and '{"name"' not in joined, (text, joined)
            if result.reasoning_content is not None:
                assert "<think" not in joined


def test_stream_tool_call_delta_format():
    parser = StreamParser(NAMES, parse_tools=True)
    deltas = [parser.feed(ch) for ch in GUIDE_SEARCH] + [parser.finish()]
    with_calls = [d for d in deltas if "tool_calls" in d]
    assert len(with_calls) == 1  # the block is judged (and sent) whole, when </tool_calls> arrives
    calls = with_calls[0]["tool_calls"]
    assert [c["index"] for c in calls] == [0, 1]
    for c in calls:
        assert c.keys() == {"index", "id", "type", "function"} and c["type"] == "function"
        assert c["function"]["name"] == "search_web" and json.loads(c["function"]["arguments"])["query_tag"]
    assert with_calls[0] is deltas[GUIDE_SEARCH.index("</tool_calls>") + len("</tool_calls>") - 1]
    # reasoning is streamed as it comes
    assert sum("reasoning_content" in d for d in deltas) > 50
    assert parser.called_tools


# ---- request side --------------------------------------------------------------------------------------------------
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}}
TIME_TOOL = {"type": "function", "function": {"name": "get_current_time"}}


def test_tool_setup_choices():
    s = tool_setup([WEATHER_TOOL, TIME_TOOL], None)
    assert s.parse_tools and s.tool_names == ["get_weather", "get_current_time"] and s.guided is None
    assert s.prompt_tools[0]["name"] == "get_weather"
    s = tool_setup([WEATHER_TOOL], "none")
    assert (s.prompt_tools, s.parse_tools, s.guided) == (None, False, None)
    s = tool_setup([WEATHER_TOOL, TIME_TOOL], "required")
    assert s.guided.kind == "tool_call" and len(s.guided.tools) == 2 and s.guided.parallel
    assert not tool_setup([WEATHER_TOOL], "required", parallel_tool_calls=False).guided.parallel
    s = tool_setup([WEATHER_TOOL, TIME_TOOL], {"type": "function", "function": {"name": "get_current_time"}})
    assert [f["name"] for f in s.guided.tools] == ["get_current_time"] and not s.guided.parallel
    assert tool_setup(None, None).guided is None
    assert tool_setup([], "none").prompt_tools is None
    assert tool_setup([{"name": "bare", "parameters": {"type": "object"}}], "auto").tool_names == ["bare"]
    assert tool_setup(None, None, {"type": "json_object"}).guided.kind == "json_object"


@pytest.mark.parametrize("tools, choice, fmt, param", [
    ("nope", None, None, "tools"),
    (["nope"], None, None, "tools[0]"),
    ([{"type": "retrieval"}], None, None, "tools[0].type"),
    ([{"type": "function"}], None, None, "tools[0].function"),
    ([{"type": "function", "function": {"description": "x"}}], None, None, "tools[0].function.name"),
    ([{"type": "function", "function": {"name": ""}}], None, None, "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], None, None, "tools[0].function.parameters"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "foo"}}}], None, None,
     "tools[0].function.parameters"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}], None, None,
     "tools[0].function.parameters"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"properties": 3}}}], None, None,
     "tools[0].function.parameters"),
    ([WEATHER_TOOL, WEATHER_TOOL], None, None, "tools[1].function.name"),
    ([WEATHER_TOOL], "sometimes", None, "tool_choice"),
    ([WEATHER_TOOL], {"type": "function", "function": {"name": "other"}}, None, "tool_choice"),
    ([WEATHER_TOOL], {"type": "function"}, None, "tool_choice"),
    (None, "required", None, "tool_choice"),
    ([WEATHER_TOOL], "required", {"type": "json_object"}, "response_format"),
    (None, None, {"type": "xml"}, "response_format.type"),
    (None, None, {"type": "json_schema"}, "response_format.json_schema"),
    (None, None, {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}},
     "response_format.json_schema.schema"),
])
def test_bad_tool_requests_name_the_field(tools, choice, fmt, param):
    with pytest.raises(InvalidRequest) as e:
        tool_setup(tools, choice, fmt)
    assert e.value.param == param and str(e.value).startswith(param), (e.value.param, str(e.value))


def test_response_format_specs():
    assert response_format_spec(None) is None and response_format_spec({"type": "text"}) is None
    spec = response_format_spec({"type": "json_schema", "json_schema": {"name": "p", "strict": True,
                                                                        "schema": {"type": "object"}}})
    assert spec.kind == "json_schema" and spec.param == "response_format.json_schema.schema"
