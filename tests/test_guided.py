"""Guided (grammar-constrained) decoding with llguidance on the tiny random model: JSON schema, any JSON object,
regex and forced tool calls always come out valid, batched with each other and with unguided requests."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from cluster.api.tool_parser import parse_output
from cluster.engine.engine import Engine, EngineConfig
from cluster.engine.guided import GuidedSpec, apply_guides, compiler_for, create_guide, tool_call_lark
from cluster.engine.sampling import InvalidRequest, SamplingParams
from model_shards.tokenizer import Tokenizer


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": ["string", "null"], "maxLength": 20},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["admin", "dev", "ops"]}, "maxItems": 3},
        "active": {"type": "boolean"},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                      "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "active", "address"],
    "additionalProperties": False,
}
WEATHER = {"name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object",
                          "properties": {"location": {"type": "string", "maxLength": 30},
                                         "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                          "required": ["location", "unit"], "additionalProperties": False}}
SEARCH = {"name": "search_web", "description": "Search the web",
          "parameters": {"type": "object",
                         "properties": {"query_list": {"type": "array", "items": {"type": "string", "maxLength": 15},
                                                       "minItems": 1, "maxItems": 2},
                                        "query_tag": {"type": "array", "items": {"type": "string", "maxLength": 10},
                                                      "maxItems": 2}},
                         "required": ["query_list"], "additionalProperties": False}}
TIME = {"name": "get_current_time"}  # no parameters: arguments must be {}


@pytest.fixture(scope="module", params=DEVICES)
def engine(request, tiny_model):
    with Engine(EngineConfig(model=str(tiny_model), device=request.param, max_num_seqs=16,
                             max_model_len=1024)) as e:
        yield e


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return Tokenizer.from_dir(tiny_model)


def params(guided, **kw):
    return SamplingParams(**{"max_tokens": 300, "temperature": 1.0, **kw, "guided": guided})


def test_json_schema_always_validates_across_seeds_and_temperatures(engine):
    spec = GuidedSpec.json_schema(PERSON)
    plain_ref = engine.generate("The quick brown fox", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    runs = [(seed, t) for seed in range(4) for t in (0.0, 0.7, 1.0, 1.6)]
    streams = [engine.submit("Describe a person as JSON.", params(spec, seed=seed, temperature=t)) for seed, t in runs]
    # an unguided request in the same batches is not affected
    plain = engine.submit("The quick brown fox", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    for (seed, t), s in zip(runs, streams):
        out = s.result()
        assert out.finish_reason == "stop", (seed, t, out.text)
        assert out.token_ids[-1] == engine.tokenizer.eos_token_id
        jsonschema.validate(json.loads(out.text), PERSON)
        assert ", " in out.text and "\n" not in out.text  # compact, json.dumps-style
    assert plain.result().token_ids == plain_ref.token_ids


def test_json_object_and_regex(engine):
    regex = r"[a-z]{2,4}-[0-9]{3}( ok)?"
    objects = [engine.submit("JSON please", params(GuidedSpec.json_object(), seed=s, max_tokens=400))
               for s in range(3)]
    codes = [engine.submit("code:", params(GuidedSpec.regex_spec(regex), seed=s, temperature=1.2)) for s in range(3)]
    for out in (s.result() for s in objects):
        assert out.finish_reason == "stop"
        assert isinstance(json.loads(out.text), dict)
    for out in (s.result() for s in codes):
        assert out.finish_reason == "stop"
        assert re.fullmatch(regex, out.text), out.text


@pytest.mark.parametrize("functions, parallel", [([WEATHER], False), ([WEATHER, SEARCH, TIME], True)])
def test_forced_tool_call_parses_and_validates(engine, functions, parallel):
    spec = GuidedSpec.tool_call(functions, parallel=parallel)
    by_name = {f["name"]: f for f in functions}
    seen = set()
    streams = [engine.submit("What is the weather in Paris?", params(spec, seed=seed, max_tokens=400))
               for seed in range(5)]
    for out in (s.result() for s in streams):
        assert out.finish_reason == "stop", out.text
        assert out.text.startswith("<tool_calls>\n{\"name\": ") and out.text.endswith("}\n</tool_calls>")
        parsed = parse_output(out.text, list(by_name), parse_tools=True)
        assert parsed.content is None and parsed.tool_calls, out.text
        if not parallel:
            assert len(parsed.tool_calls) == 1
        for call in parsed.tool_calls:
            fn = by_name[call["function"]["name"]]
            args = json.loads(call["function"]["arguments"])
            jsonschema.validate(args, fn.get("parameters", {"type": "object", "additionalProperties": False}))
            seen.add(fn["name"])
    assert len(seen) >= min(2, len(functions))  # "required" really lets the model pick


def test_grammar_end_ends_the_request_with_ignore_eos_and_min_tokens(engine):
    spec = GuidedSpec.regex_spec(r"(yes|no)")
    out = engine.generate("ok?", params(spec, ignore_eos=True, min_tokens=50, max_tokens=100, seed=1))
    assert out.finish_reason == "stop" and out.text in ("yes", "no")
    assert len(out.token_ids) <= 3


def test_guided_logprobs_are_of_allowed_tokens(engine):
    out = engine.generate("x", params(GuidedSpec.regex_spec("[0-9]{4}"), logprobs=3, seed=0))
    assert out.finish_reason == "stop" and out.text.isdigit()
    for lp in out.logprobs:
        assert lp.logprob > -1e9
    assert all(v == float("-inf") or v > -1e9 for lp in out.logprobs for _, v in lp.top)


def test_unenforceable_and_invalid_specs_are_client_errors(engine):
    with pytest.raises(InvalidRequest) as e:
        engine.submit("x", params(GuidedSpec.json_schema({"type": "string", "format": "no-such-format"},
                                                         "guided_json")))
    assert e.value.param == "guided_json" and "cannot be enforced" in str(e.value)
    with pytest.raises(InvalidRequest) as e:
        engine.submit("x", params(GuidedSpec.json_schema({"type": "nope"}, "response_format.json_schema.schema")))
    assert e.value.param == "response_format.json_schema.schema" and "type" in str(e.value)
    with pytest.raises(InvalidRequest) as e:
        engine.submit("x", params(GuidedSpec.regex_spec("[a-")))
    assert e.value.param == "guided_regex"
    with pytest.raises(InvalidRequest) as e:
        engine.submit("x", params(GuidedSpec.tool_call([{"name": "f", "parameters": {"type": "number"}}])))
    assert e.value.param == "tools[0].parameters"
    with pytest.raises(InvalidRequest):
        SamplingParams(guided="json").validate()


def test_masks_cover_model_rows_beyond_the_tokenizer(tokenizer):
    vocab = tokenizer.vocab_size + 70  # embedding rows past the tokenizer's ids (the real model pads to 200064)
    compiler = compiler_for(tokenizer, vocab)
    assert compiler.ll_tokenizer.vocab_size == vocab
    guides = [compiler.guide(GuidedSpec.json_object()), compiler.guide(GuidedSpec.regex_spec("a+"))]
    for device in DEVICES:
        logits = torch.zeros(3, vocab, device=device)
        apply_guides(logits, [0, 2], guides)
        allowed = [set(torch.isfinite(row).nonzero().flatten().tolist()) for row in logits.cpu()]
        assert allowed[1] == set(range(vocab))  # an unguided row is untouched
        assert allowed[0] and all(t < tokenizer.vocab_size for t in allowed[0])
        assert all(tokenizer.decode([t]).startswith("{") for t in allowed[0])
        assert all(set(tokenizer.decode([t])) == {"a"} for t in allowed[2])
    # a finished grammar allows only EOS
    g = create_guide(tokenizer, vocab, GuidedSpec.regex_spec("ab"))
    for t in tokenizer.encode("ab"):
        assert not g.advance(t)
    logits = torch.zeros(1, vocab)
    apply_guides(logits, [0], [g])
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [tokenizer.eos_token_id]
    assert g.advance(tokenizer.eos_token_id)


def test_tool_call_grammar_text():
    lark = tool_call_lark([WEATHER, {"name": 'we"ird name'}], parallel=True)
    assert lark.startswith('start: "<tool_calls>\\n" call ("\\n" call)* "\\n</tool_calls>"')
    assert '\\"we\\\\\\"ird name\\"' in lark  # the name is a JSON string inside a Lark string
    assert '"additionalProperties": false' in lark  # no parameters: no arguments
