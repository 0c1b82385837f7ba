"""Grammar-constrained (guided) decoding with llguidance: JSON schema, any JSON object, regex, forced tool calls.

A request asks for it with SamplingParams.guided = GuidedSpec(...). At submit() the engine compiles the spec into an
llguidance matcher (`create_guide`; a bad or unenforceable spec raises InvalidRequest naming the request field).
Every step, the masks of all guided rows of the batch are computed together on CPU by llguidance's thread pool
(`apply_guides` -> LLExecutor via fill_next_token_bitmask_par), copied to the logits' device once, unpacked there
and applied before sampling, so greedy and random sampling both only see allowed tokens. The sampled token is then
fed to the matcher (`Guide.advance`). When the grammar is complete the only allowed token is EOS; sampling it
ends the request with finish_reason "stop" (also with ignore_eos: the grammar's end is the request's end).

The llguidance tokenizer is built from our HF `tokenizers` tokenizer (its tokenizer.json text, added tokens
included) with n_vocab = the model's vocab size (embedding rows): ids the tokenizer does not have are never
allowed. Built once per (tokenizer, vocab size) and cached; compiled grammars are cached too (a new request deep-
copies a fresh matcher, microseconds).

JSON is generated compactly with json.dumps' separators (", " and ": ", no other whitespace), which keeps even a
random model from wandering off into whitespace; a schema's own "x-guidance" options override that.

Forced tool call (tool_choice "required" or a named function) output, as MiniMax-M1 writes tool calls:

    <tool_calls>
    {"name": "<fn>", "arguments": <object valid for that function's parameters schema>}
    </tool_calls>

with one or more call lines (any of the tools) for "required", exactly one call (of the named function) for a
named choice or when parallel calls are off.
"""

from __future__ import annotations

import json
import logging
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from .sampling import InvalidRequest

log = logging.getLogger("m1serve.guided")

KINDS = ("json_schema", "json_object", "regex", "tool_call")
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_SPEC_CHARS = 1_000_000
GRAMMAR_CACHE_SIZE = 256
MAX_TOOL_NAME_CHARS = 256


# ---- spec ----------------------------------------------------------------------------------------------------------
def check_json_schema(schema: Any, param: str) -> None:
    """InvalidRequest(param) unless `schema` is a JSON object that is a valid JSON schema (checked against its
    metaschema with the `jsonschema` package when it is installed; llguidance catches most errors otherwise)."""
    if not isinstance(schema, dict):
        raise InvalidRequest(f"{param}: must be a JSON schema object, got {type(schema).__name__}", param)
    try:
        from jsonschema import SchemaError
        from jsonschema.validators import validator_for
    except ImportError:  # pragma: no cover - jsonschema comes with ray
        return
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as e:
        where = "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in e.absolute_path)
        raise InvalidRequest(f"{param}: invalid JSON schema at {where or 'the top level'}: {e.message}", param) \
            from None
    except Exception as e:  # e.g. an unresolvable $schema
        raise InvalidRequest(f"{param}: invalid JSON schema: {e}", param) from None


def tool_arguments_schema(function: dict) -> dict:
    """The JSON schema a tool call's arguments must match: the function's "parameters" (an object schema; no
    parameters means no arguments, i.e. `{}`)."""
    params = function.get("parameters")
    if params is None:
        return {"type": "object", "properties": {}, "additionalProperties": False}
    if "type" not in params:
        params = {**params, "type": "object"}
    return params


def check_function(function: Any, param: str) -> None:
    """A bare function schema {"name", "description"?, "parameters"?}; InvalidRequest names the bad field."""
    if not isinstance(function, dict):
        raise InvalidRequest(f"{param}: must be an object, got {type(function).__name__}", param)
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequest(f"{param}.name: is required (a non-empty string)", f"{param}.name")
    if len(name) > MAX_TOOL_NAME_CHARS or any(ord(c) < 32 for c in name):
        raise InvalidRequest(f"{param}.name: must be at most {MAX_TOOL_NAME_CHARS} characters without control "
                             "characters", f"{param}.name")
    desc = function.get("description")
    if desc is not None and not isinstance(desc, str):
        raise InvalidRequest(f"{param}.description: must be a string", f"{param}.description")
    params = function.get("parameters")
    if params is not None:
        check_json_schema(params, f"{param}.parameters")
        kind = params.get("type", "object")
        if kind != "object" and not (isinstance(kind, list) and "object" in kind):
            raise InvalidRequest(f"{param}.parameters: must describe an object (type 'object'), got type {kind!r}",
                                 f"{param}.parameters")


@dataclass(frozen=True, eq=False)
class GuidedSpec:
    """What guided decoding enforces. Build it with the classmethods; `param` is the request field errors name."""

    kind: str
    schema: dict | None = None  # json_schema
    regex: str | None = None  # regex
    tools: tuple = ()  # tool_call: bare function schemas {"name", "parameters"}
    parallel: bool = True  # tool_call: more than one call line allowed
    param: str = "response_format"
    _grammar: list = field(default_factory=list, repr=False)  # memo

    @classmethod
    def json_schema(cls, schema: dict, param: str = "response_format") -> "GuidedSpec":
        return cls("json_schema", schema=schema, param=param)

    @classmethod
    def json_object(cls, param: str = "response_format") -> "GuidedSpec":
        return cls("json_object", param=param)

    @classmethod
    def regex_spec(cls, regex: str, param: str = "guided_regex") -> "GuidedSpec":
        return cls("regex", regex=regex, param=param)

    @classmethod
    def tool_call(cls, functions: list[dict], parallel: bool = True, param: str = "tool_choice") -> "GuidedSpec":
        """Forces `<tool_calls>` with calls of `functions` (all tools for "required", one for a named choice)."""
        return cls("tool_call", tools=tuple(functions), parallel=parallel, param=param)

    def validate(self) -> "GuidedSpec":
        p = self.param
        if self.kind not in KINDS:
            raise InvalidRequest(f"{p}: unknown guided decoding kind {self.kind!r}", p)
        if self.kind == "json_schema":
            check_json_schema(self.schema, p)
        elif self.kind == "regex":
            if not isinstance(self.regex, str) or not self.regex:
                raise InvalidRequest(f"{p}: must be a non-empty regular expression", p)
        elif self.kind == "tool_call":
            if not self.tools:
                raise InvalidRequest(f"{p}: a forced tool call needs at least one tool", p)
            names = set()
            for i, fn in enumerate(self.tools):
                check_function(fn, f"tools[{i}]")
                if fn["name"] in names:
                    raise InvalidRequest(f"tools[{i}].name: duplicate tool name {fn['name']!r}", f"tools[{i}].name")
                names.add(fn["name"])
        if len(self.grammar()) > MAX_SPEC_CHARS:
            raise InvalidRequest(f"{p}: the schema is too large (over {MAX_SPEC_CHARS} characters)", p)
        return self

    def grammar(self) -> str:
        """The llguidance grammar (JSON or Lark text)."""
        if not self._grammar:
            self._grammar.append(self._build_grammar())
        return self._grammar[0]

    def _build_grammar(self) -> str:
        if self.kind == "json_schema":
            return _json_grammar(self.schema)
        if self.kind == "json_object":
            return _json_grammar({"type": "object"})
        if self.kind == "regex":
            from llguidance import LLMatcher

            return LLMatcher.grammar_from_regex(self.regex)
        return json.dumps({"grammars": [{"lark_grammar": tool_call_lark(self.tools, self.parallel)}]})


def _json_grammar(schema: dict) -> str:
    from llguidance import LLMatcher

    return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)


def _lark_str(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def tool_call_lark(functions, parallel: bool = True) -> str:
    """Lark grammar for `<tool_calls>\\n{"name": ..., "arguments": ...}\\n...</tool_calls>` (model.md §7)."""
    lines = ['start: "<tool_calls>\\n" call' + (' ("\\n" call)*' if parallel else "") + ' "\\n</tool_calls>"',
             "call: " + " | ".join(f"call_{i}" for i in range(len(functions)))]
    for i, fn in enumerate(functions):
        head = '{"name": ' + json.dumps(fn["name"], ensure_ascii=False) + ', "arguments": '
        schema = tool_arguments_schema(fn)
        schema = {**schema, "x-guidance": {**JSON_OPTIONS, **(schema.get("x-guidance") or {})}}
        lines.append(f"call_{i}: {_lark_str(head)} args_{i} \"}}\"")
        lines.append(f"args_{i}: %json {json.dumps(schema, ensure_ascii=False)}")
    return "\n".join(lines) + "\n"


# ---- compiler (per tokenizer) ---------------------------------------------------------------------------------------
class GrammarCompiler:
    """llguidance tokenizer + grammar cache + the executor that computes a batch of masks in parallel."""

    def __init__(self, tokenizer, vocab_size: int):
        import llguidance

        self.eos_id = tokenizer.eos_token_id
        self.vocab_size = max(int(vocab_size), tokenizer.vocab_size)
        backend = tokenizer._tok  # the HF `tokenizers` Tokenizer (with the added tokens from tokenizer_config.json)
        self.ll_tokenizer = llguidance.LLTokenizer(backend.to_str(), n_vocab=self.vocab_size, eos_token=self.eos_id)
        self.words = (self.ll_tokenizer.vocab_size + 31) // 32  # int32 words per mask row
        self._executor = None
        self._templates: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._shifts: dict[torch.device, torch.Tensor] = {}

    @property
    def executor(self):
        if self._executor is None:
            import llguidance

            self._executor = llguidance.LLExecutor()
        return self._executor

    def guide(self, spec: GuidedSpec) -> "Guide":
        import llguidance

        grammar = spec.grammar()
        with self._lock:
            template = self._templates.get(grammar)
            if template is not None:
                self._templates.move_to_end(grammar)
        if template is None:
            template = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
            if template.is_error():
                raise InvalidRequest(f"{spec.param}: cannot be enforced by guided decoding: "
                                     f"{template.get_error().strip()}", spec.param)
            with self._lock:
                self._templates[grammar] = template
                while len(self._templates) > GRAMMAR_CACHE_SIZE:
                    self._templates.popitem(last=False)
        return Guide(template.deep_copy(), self)

    def shifts(self, device: torch.device) -> torch.Tensor:
        s = self._shifts.get(device)
        if s is None:
            s = self._shifts[device] = torch.arange(32, dtype=torch.int32, device=device)
        return s


_compilers: "weakref.WeakKeyDictionary[Any, dict[int, GrammarCompiler]]" = weakref.WeakKeyDictionary()
_compilers_lock = threading.Lock()


def compiler_for(tokenizer, vocab_size: int) -> GrammarCompiler:
    with _compilers_lock:
        per_size = _compilers.setdefault(tokenizer, {})
        c = per_size.get(vocab_size)
        if c is None:
            c = per_size[vocab_size] = GrammarCompiler(tokenizer, vocab_size)
        return c


def create_guide(tokenizer, vocab_size: int, spec: GuidedSpec) -> "Guide":
    """A fresh guide for one request (InvalidRequest if the spec cannot be compiled)."""
    if tokenizer is None:
        raise InvalidRequest(f"{spec.param}: guided decoding needs the model's tokenizer, and this model has none",
                             spec.param)
    return compiler_for(tokenizer, vocab_size).guide(spec)


# ---- per request ---------------------------------------------------------------------------------------------------
class Guide:
    """One request's grammar state."""

    def __init__(self, matcher, compiler: GrammarCompiler):
        self.matcher, self.compiler, self.eos_id = matcher, compiler, compiler.eos_id
        self.done = False  # the grammar has ended (EOS consumed) or failed

    def advance(self, token: int) -> bool:
        """Feeds the sampled token; True once the grammar has ended (EOS after a complete output) or failed."""
        if self.done:
            return True
        if not self.matcher.consume_token(token):
            log.warning("guided decoding: token %d rejected (%s); ending the request", token,
                        self.matcher.get_error())
            self.done = True
        elif token == self.eos_id or self.matcher.is_error():
            self.done = True
        return self.done

    @property
    def error(self) -> str:
        return self.matcher.get_error()


def apply_guides(logits: torch.Tensor, rows: list[int], guides: list[Guide]) -> torch.Tensor:
    """Masks logits[rows[i]] to the tokens guides[i] allows, in place (logits: [B, V] fp32 on any device): one
    parallel llguidance call for all rows, one host-to-device copy. Returns logits."""
    by_compiler: dict[int, list[int]] = {}
    for i, g in enumerate(guides):
        by_compiler.setdefault(id(g.compiler), []).append(i)
    for members in by_compiler.values():  # one group unless guides come from different tokenizers
        _apply(logits, [rows[i] for i in members], [guides[i] for i in members])
    return logits


def _apply(logits: torch.Tensor, rows: list[int], guides: list[Guide]) -> None:
    compiler = guides[0].compiler
    bitmask = torch.zeros(len(rows), compiler.words, dtype=torch.int32)
    # what llguidance.torch.fill_next_token_bitmask_par does (that module imports torch.compile machinery: seconds)
    compiler.executor.unsafe_compute_mask_ptr([(g.matcher, i) for i, g in enumerate(guides)], bitmask.data_ptr(),
                                              compiler.words * 4, len(rows))
    empty = (bitmask == 0).all(dim=1)
    if bool(empty.any()):  # a failed matcher allows nothing: let it end with EOS
        eos = compiler.eos_id
        bitmask[empty, eos // 32] |= _bit(eos % 32)
    device = logits.device
    if device.type == "cuda":
        bitmask = bitmask.pin_memory().to(device, non_blocking=True)
    else:
        bitmask = bitmask.to(device)
    vocab = logits.shape[1]
    bits = ((bitmask.unsqueeze(-1) >> compiler.shifts(device)) & 1).reshape(len(rows), -1)
    allowed = torch.zeros(len(rows), vocab, dtype=torch.bool, device=device)
    n = min(vocab, bits.shape[1])
    allowed[:, :n] = bits[:, :n].bool()
    index = torch.tensor(rows, device=device)
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))


def _bit(i: int) -> int:
    return (1 << i) - (1 << 32) if i == 31 else 1 << i  # as an int32 (bit 31 is the sign)
