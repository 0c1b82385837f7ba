import json
import random

import pytest

from model_shards.tiny_tokenizer import SPECIAL_TOKENS, write_tiny_tokenizer
from model_shards.tokenizer import (DEFAULT_CHAT_TEMPLATE, IncrementalDetokenizer, Tokenizer, TokenizerError,
                                    normalize_messages)

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces\n\tand tabs\r\n",
    "今天天气很好，我们去公园散步吧。",
    "Emoji: 😀🚀🔥 👨‍👩‍👧‍👦 🇨🇳 ❤️ and a rare one: 🦩🫠",
    "Mixed: naïve café, Grüße, Привет, مرحبا, こんにちは, 한국어, ∑∫√∞, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "def f(x):\n    return {'a': [1, 2, 3]}  # code\n",
    "",
]

SYSTEM_USER = ("<begin_of_document><beginning_of_sentence>system ai_setting=assistant\n"
               "You are helpful.<end_of_sentence>\n"
               "<beginning_of_sentence>user name=user\nHi there<end_of_sentence>\n"
               "<beginning_of_sentence>ai name=assistant\n")

TOOLS = [{"name": "get_weather", "description": "Get the weather",
          "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}]

TOOLS_BLOCK = (
    "<beginning_of_sentence>system tool_setting=tools\nYou are provided with these tools:\n<tools>\n"
    '{"name": "get_weather", "description": "Get the weather", "parameters": {"type": "object", '
    '"properties": {"location": {"type": "string"}}, "required": ["location"]}}\n'
    "</tools>\n\nIf you need to call tools, please respond with <tool_calls></tool_calls> XML tags, and provide "
    "tool-name and json-object of arguments, following the format below:\n<tool_calls>\n"
    '{"name": <tool-name-1>, "arguments": <args-json-object-1>}\n...\n</tool_calls><end_of_sentence>\n'
)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_tiny_tokenizer(d, 512)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.from_dir(tok_dir)


def byte_token_ids(tok):
    """id of the single-byte token for each byte value (GPT-2 byte-to-unicode table)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    ids = [tok.token_to_id(chars[b]) for b in range(256)]
    assert None not in ids
    return ids


# ---------------------------------------------------------------- tiny tokenizer + basic encode/decode

def test_vocab_size_and_determinism(tmp_path, tok):
    assert tok.vocab_size == 512
    for v in (300, 301, 1000):
        write_tiny_tokenizer(tmp_path / str(v), v)
        assert Tokenizer.from_dir(tmp_path / str(v)).vocab_size <= v
    write_tiny_tokenizer(tmp_path / "again", 512)
    write_tiny_tokenizer(tmp_path / "again2", 512)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "again2" / name).read_bytes()
    with pytest.raises(ValueError):
        write_tiny_tokenizer(tmp_path / "small", 299)


@pytest.mark.parametrize("text", TEXTS)
def test_roundtrip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_special_tokens(tok):
    first = tok.vocab_size - len(SPECIAL_TOKENS)
    for k, t in enumerate(SPECIAL_TOKENS):
        assert tok.encode(t) == [first + k]
        assert tok.token_to_id(t) == first + k
        assert tok.id_to_token(first + k) == t
    eos = tok.token_to_id("<end_of_sentence>")
    assert tok.eos_token_id == eos
    assert eos in tok.stop_token_ids
    ids = tok.encode("a<end_of_sentence>b<pad>")
    assert eos in ids and tok.token_to_id("<pad>") == ids[-1]
    assert tok.decode(ids) == "a<end_of_sentence>b<pad>"
    assert tok.decode(ids, skip_special_tokens=True) == "ab"
    assert tok.encode("hello")[0] != tok.token_to_id("<beginning_of_sentence>")  # no BOS added


def test_matches_transformers(tok_dir, tok):
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"))
    for text in TEXTS + [SYSTEM_USER, "x<end_of_sentence>y <pad>"]:
        ids = tok.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids
        assert hf.decode(ids) == tok.decode(ids)


# ---------------------------------------------------------------- errors

def test_missing_tokenizer_json(tmp_path, tok_dir):
    (tmp_path / "tokenizer_config.json").write_text((tok_dir / "tokenizer_config.json").read_text())
    with pytest.raises(TokenizerError, match="tokenizer.json") as e:
        Tokenizer.from_dir(tmp_path)
    assert isinstance(e.value, ValueError)


def test_bad_config_files(tmp_path, tok_dir):
    (tmp_path / "tokenizer.json").write_text((tok_dir / "tokenizer.json").read_text())
    with pytest.raises(TokenizerError, match="tokenizer_config.json.*not found"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer_config.json.*invalid JSON"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0"}')
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


# ---------------------------------------------------------------- chat template

def test_template_system_user(tok):
    msgs = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi there"}]
    assert tok.apply_chat_template(msgs) == SYSTEM_USER
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == SYSTEM_USER.removesuffix(
        "<beginning_of_sentence>ai name=assistant\n")
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE


def test_template_string_and_parts_agree(tok):
    as_str = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi there"},
              {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    as_parts = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in as_str]
    split = [{"role": "system", "content": [{"type": "text", "text": "You are "}, {"type": "text", "text": "helpful."}]}]
    assert tok.apply_chat_template(as_str) == tok.apply_chat_template(as_parts)
    assert tok.apply_chat_template(as_str, tools=TOOLS) == tok.apply_chat_template(as_parts, tools=TOOLS)
    assert tok.apply_chat_template(split + as_str[1:]) == tok.apply_chat_template(as_str)


def test_template_tools(tok):
    msgs = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Weather in Paris?"}]
    expected = ("<begin_of_document><beginning_of_sentence>system ai_setting=assistant\n"
                "You are helpful.<end_of_sentence>\n" + TOOLS_BLOCK +
                "<beginning_of_sentence>user name=user\nWeather in Paris?<end_of_sentence>\n"
                "<beginning_of_sentence>ai name=assistant\n")
    assert tok.apply_chat_template(msgs, tools=TOOLS) == expected
    # no system message: the tool block directly follows the document prefix
    assert tok.apply_chat_template(msgs[1:], tools=TOOLS) == (
        "<begin_of_document>" + TOOLS_BLOCK + expected.split(TOOLS_BLOCK)[1])


def test_template_tool_calls_and_results(tok):
    msgs = [
        {"role": "user", "content": "Weather in Paris and 上海?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"location":"Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"location": "上海"}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C, cloudy"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "25C, sunny"}]},
        {"role": "assistant", "content": "Paris: 18C. Shanghai: 25C."},
        {"role": "user", "content": "And Rome?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"id": "call_3", "type": "function", "function": {"name": "get_weather", "arguments": {"location": "Rome"}}}]},
        {"role": "tool", "name": "get_weather", "content": "21C"},
    ]
    expected = (
        "<begin_of_document>" + TOOLS_BLOCK +
        "<beginning_of_sentence>user name=user\nWeather in Paris and 上海?<end_of_sentence>\n"
        "<beginning_of_sentence>ai name=assistant\n<tool_calls>\n"
        '{"name": "get_weather", "arguments": {"location": "Paris"}}\n'
        '{"name": "get_weather", "arguments": {"location": "上海"}}\n'
        "</tool_calls><end_of_sentence>\n"
        "<beginning_of_sentence>tool name=tools\n"
        "tool name: get_weather\ntool result: 18C, cloudy\n\n"
        "tool name: get_weather\ntool result: 25C, sunny\n\n<end_of_sentence>\n"
        "<beginning_of_sentence>ai name=assistant\nParis: 18C. Shanghai: 25C.<end_of_sentence>\n"
        "<beginning_of_sentence>user name=user\nAnd Rome?<end_of_sentence>\n"
        "<beginning_of_sentence>ai name=assistant\nLet me check.\n<tool_calls>\n"
        '{"name": "get_weather", "arguments": {"location": "Rome"}}\n'
        "</tool_calls><end_of_sentence>\n"
        "<beginning_of_sentence>tool name=tools\ntool name: get_weather\ntool result: 21C\n\n<end_of_sentence>\n"
        "<beginning_of_sentence>ai name=assistant\n"
    )
    assert tok.apply_chat_template(msgs, tools=TOOLS) == expected


def test_template_errors(tok):
    with pytest.raises(TokenizerError, match="unknown role 'robot'"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}])
    with pytest.raises(TokenizerError, match="image_url"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(TokenizerError, match="content must be"):
        tok.apply_chat_template([{"role": "user", "content": 42}])
    with pytest.raises(TokenizerError, match="tool call"):
        tok.apply_chat_template([{"role": "assistant", "content": "", "tool_calls": [{"id": "x"}]}])


def test_fallback_template(tmp_path, tok_dir, tok):
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "tokenizer.json").write_text((tok_dir / "tokenizer.json").read_text())
    fallback = Tokenizer.from_dir(tmp_path)
    assert fallback.chat_template == DEFAULT_CHAT_TEMPLATE
    msgs = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi there"}]
    assert fallback.apply_chat_template(msgs) == SYSTEM_USER


def test_template_renders_like_transformers(tok_dir, tok):
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"))
    hf.chat_template = DEFAULT_CHAT_TEMPLATE
    msgs = [{"role": "system", "content": "S <b>&</b>"}, {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a", "tool_calls": [
                {"id": "1", "type": "function", "function": {"name": "get_weather", "arguments": '{"x": "<&>"}'}}]},
            {"role": "tool", "tool_call_id": "1", "content": "r"}]
    hf_text = hf.apply_chat_template(normalize_messages(msgs), tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(msgs, tools=TOOLS) == hf_text


# ---------------------------------------------------------------- incremental detokenization

def stream(tok, ids, prompt_ids=None, skip_special_tokens=True):
    detok = IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens=skip_special_tokens)
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    return deltas


CHAR_POOL = list("abc xyz.,\n") + list("你好世界天气语言模型") + list("éüñøß") + ["😀", "🚀", "🦩", "👨‍👩‍👧", "∑", "€"]


def random_ids(tok, rng, byte_ids):
    """Valid text as a random mix of BPE tokens and single-byte tokens (splits multibyte chars)."""
    text = "".join(rng.choice(CHAR_POOL) for _ in range(rng.randint(1, 40)))
    ids = []
    for ch in text:
        if rng.random() < 0.5:
            ids += tok.encode(ch)
        else:
            ids += [byte_ids[b] for b in ch.encode()]
        if rng.random() < 0.05:
            ids.append(tok.token_to_id(rng.choice(SPECIAL_TOKENS)))
    return ids


@pytest.mark.parametrize("skip", [True, False])
def test_incremental_matches_decode(tok, skip):
    rng = random.Random(1234)
    byte_ids = byte_token_ids(tok)
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "你好"}]))
    for trial in range(300):
        ids = random_ids(tok, rng, byte_ids)
        prompt_ids = [None, [], prompt, prompt + [byte_ids[0xE4]]][trial % 4]  # last one ends mid-character
        deltas = stream(tok, ids, prompt_ids, skip)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in d for d in deltas)


def test_incremental_holds_back_partial_chars(tok):
    byte_ids = byte_token_ids(tok)
    ids = [byte_ids[b] for b in "你😀".encode()]
    detok = IncrementalDetokenizer(tok)
    out = [detok.add(i) for i in ids]
    assert out == ["", "", "你", "", "", "", "😀"]
    assert detok.flush() == ""


def test_incremental_arbitrary_ids(tok):
    # Invalid UTF-8 byte sequences: the stream must still reproduce decode() exactly.
    rng = random.Random(99)
    for _ in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 30))]
        for skip in (True, False):
            assert "".join(stream(tok, ids, None, skip)) == tok.decode(ids, skip_special_tokens=skip)


def test_incremental_window_stays_small(tok):
    detok = IncrementalDetokenizer(tok, tok.encode("prompt"))
    text = "Streaming a long answer, 你好 😀. " * 200
    out = []
    for i in tok.encode(text):
        out.append(detok.add(i))
        assert len(detok.ids) <= 8
    out.append(detok.flush())
    assert "".join(out) == text
