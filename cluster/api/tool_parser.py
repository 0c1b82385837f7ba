"""MiniMax-M1 output -> OpenAI `reasoning_content`, `content` and `tool_calls`, whole or streamed; and the request
side of tools (validation, tool_choice -> prompt tools / parsing / guided decoding), shared by HTTP and gRPC.

Model output (model.md §7, MiniMax's function-call guide):

    <think>
    ...reasoning...
    </think>
    Some text.
    <tool_calls>
    {"name": "search_web", "arguments": {"query_list": ["..."]}}
    {"name": "get_weather", "arguments": {"location": "Shanghai"}}
    </tool_calls>

Rules (parse_output and StreamParser give the same result for any split of the text into deltas):

- Reasoning: only when the output starts with `<think>` (after optional whitespace). It runs to the first `</think>`,
  or to the end if that never comes (reasoning so far). reasoning_content is that text stripped of surrounding
  whitespace; None when the output has no leading `<think>`. Anything inside it (a `<tool_calls>` included) stays
  reasoning.
- Tool calls (only when tool parsing is on: the request has tools and tool_choice is not "none"): a block runs from
  `<tool_calls>` to the first `</tool_calls>`, or to the end of the output (unterminated block). Its body must be one
  or more JSON objects (one per line in practice; any whitespace between them is accepted) each with a "name" of a
  tool of the request and "arguments" (an object, or a string holding a JSON object; missing means {}); stray extra
  closing braces after an object are dropped (vLLM's repair). Arguments are re-dumped with json.dumps. A block that
  is not entirely well-formed (bad JSON, unknown tool, not an object, empty, cut mid-object) stays plain content,
  tags included: malformed output never raises.
- Content: the rest, verbatim, except that whitespace next to a `</think>` or a parsed tool-call block is dropped.
  None when it is empty and there are tool calls or reasoning; otherwise a string ("" for an empty output).

Streaming (StreamParser): deltas never split a tag and never show a partial `<think>`, `</think>`, `<tool_calls>` or a
tool-call block as content: possible tag prefixes (and whitespace that may turn out to be next to a tag) are held
back until the next text decides them. Tool calls are streamed whole: once their block is complete (or the output
ends), each call comes as ONE delta entry carrying index, id, type "function", function.name and the complete
function.arguments (OpenAI clients accumulate that the same way as argument fragments). Calls can only be emitted
once the whole block is known to be well-formed, since a malformed block must become content.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Collection

from ..engine.guided import GuidedSpec, check_function, check_json_schema
from ..engine.sampling import InvalidRequest

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALLS_OPEN, CALLS_CLOSE = "<tool_calls>", "</tool_calls>"
_WS = " \t\n\r\f\v"


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call(index: int, name: str, arguments: str) -> dict:
    return {"index": index, "id": new_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


@dataclass
class ParsedOutput:
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[dict] = field(default_factory=list)  # {"index", "id", "type", "function": {"name", "arguments"}}

    def message_tool_calls(self) -> list[dict]:
        """The calls as a non-streamed message carries them (no index)."""
        return [{k: v for k, v in c.items() if k != "index"} for c in self.tool_calls]


# ---- one block -----------------------------------------------------------------------------------------------------
def parse_calls_block(body: str, tool_names: Collection[str] | None) -> list[tuple[str, str]] | None:
    """[(name, arguments JSON)] for a block body, or None if it is not entirely well-formed calls of known tools.
    tool_names None: any name."""
    decoder = json.JSONDecoder()
    calls: list[tuple[str, str]] = []
    i, n = 0, len(body)
    while True:
        while i < n and body[i] in _WS:
            i += 1
        if i == n:
            break
        if body[i] != "{":
            return None
        try:
            obj, i = decoder.raw_decode(body, i)
        except (json.JSONDecodeError, RecursionError):
            return None
        while i < n and body[i] == "}":  # {"name": ..., "arguments": {...}}} : a duplicated closing brace
            i += 1
        name = obj.get("name")
        if not isinstance(name, str) or (tool_names is not None and name not in tool_names):
            return None
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except (json.JSONDecodeError, RecursionError):
                return None
        if not isinstance(args, dict):
            return None
        calls.append((name, json.dumps(args, ensure_ascii=False)))
    return calls or None


# ---- whole output --------------------------------------------------------------------------------------------------
def parse_output(text: str, tool_names: Collection[str] | None = None, parse_tools: bool = False,
                 parse_reasoning: bool = True) -> ParsedOutput:
    """The whole output -> ParsedOutput (see the module doc). Never raises on model text."""
    reasoning = None
    rest = text
    if parse_reasoning:
        s = text.lstrip(_WS)
        if s.startswith(THINK_OPEN):
            body = s[len(THINK_OPEN):]
            end = body.find(THINK_CLOSE)
            if end < 0:
                reasoning, rest = body.strip(_WS), ""
            else:
                reasoning, rest = body[:end].strip(_WS), body[end + len(THINK_CLOSE):].lstrip(_WS)
    calls: list[dict] = []
    if not parse_tools:
        content = rest
    else:
        # split into text parts and well-formed blocks; a malformed block stays inside its text part
        parts: list[str] = []  # text parts; between two consecutive parts there is one parsed block
        text_start = pos = 0
        while True:
            start = rest.find(CALLS_OPEN, pos)
            if start < 0:
                break
            body_start = start + len(CALLS_OPEN)
            close = rest.find(CALLS_CLOSE, body_start)
            end = len(rest) if close < 0 else close + len(CALLS_CLOSE)
            parsed = parse_calls_block(rest[body_start: len(rest) if close < 0 else close], tool_names)
            if parsed is not None:
                parts.append(rest[text_start:start])
                calls += [_call(len(calls) + k, name, args) for k, (name, args) in enumerate(parsed)]
                text_start = end
            pos = end
        parts.append(rest[text_start:])
        for k in range(len(parts)):  # whitespace next to a parsed block goes
            if k < len(parts) - 1:
                parts[k] = parts[k].rstrip(_WS)
            if k > 0:
                parts[k] = parts[k].lstrip(_WS)
        content = "".join(parts)
    if content == "" and (calls or reasoning is not None):
        content = None
    return ParsedOutput(content, reasoning, calls)


# ---- streamed output -----------------------------------------------------------------------------------------------
def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest proper suffix of text that is a prefix of tag."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class _Segment:
    """Emits one kind of text with optional stripping: `lstrip` drops leading whitespace, `hold_ws` holds trailing
    whitespace back until more non-whitespace follows (it is dropped or released at the segment's end)."""

    def __init__(self, lstrip: bool, hold_ws: bool):
        self.lstrip, self.hold_ws = lstrip, hold_ws
        self.held = ""

    def feed(self, text: str) -> str:
        if self.lstrip:
            text = text.lstrip(_WS)
            if not text:
                return ""
            self.lstrip = False
        if not self.hold_ws:
            return text
        text = self.held + text
        body = text.rstrip(_WS)
        self.held = text[len(body):]
        return body

    def release(self) -> str:
        held, self.held = self.held, ""
        return held

    def drop(self) -> None:
        self.held = ""


class StreamParser:
    """Feed text deltas; get OpenAI-style delta dicts ({"content"?, "reasoning_content"?, "tool_calls"?}).
    finish() flushes what was held back. The joined deltas equal parse_output(whole text) (call ids aside)."""

    START, REASONING, CONTENT, BLOCK = range(4)

    def __init__(self, tool_names: Collection[str] | None = None, parse_tools: bool = False,
                 parse_reasoning: bool = True):
        self.tool_names, self.parse_tools = tool_names, parse_tools
        self.state = self.START if parse_reasoning else self.CONTENT
        self.buf = ""
        self.reasoning_seen = False
        self.num_calls = 0
        self.finished = False
        self._content = self._new_content(lstrip=False)
        self._reasoning = _Segment(lstrip=True, hold_ws=True)
        # what was emitted, for result()
        self._out_content: list[str] = []
        self._out_reasoning: list[str] = []
        self._out_calls: list[dict] = []

    def _new_content(self, lstrip: bool) -> _Segment:
        return _Segment(lstrip=lstrip, hold_ws=self.parse_tools)

    # -- public --
    def feed(self, text: str) -> dict:
        if self.finished:
            raise RuntimeError("StreamParser: feed() after finish()")
        self.buf += text
        delta = _Delta()
        self._run(delta, final=False)
        return self._record(delta)

    def finish(self) -> dict:
        """Flushes the end of the output: held-back text, an unterminated block."""
        if self.finished:
            return {}
        delta = _Delta()
        self._run(delta, final=True)
        self.finished = True
        return self._record(delta)

    def result(self) -> ParsedOutput:
        """The accumulated result so far (after finish(): the final one)."""
        content = "".join(self._out_content)
        reasoning = "".join(self._out_reasoning) if self.reasoning_seen else None
        if content == "" and (self._out_calls or reasoning is not None):
            content = None
        return ParsedOutput(content, reasoning, list(self._out_calls))

    @property
    def called_tools(self) -> bool:
        return self.num_calls > 0

    # -- internals --
    def _record(self, delta: "_Delta") -> dict:
        out = delta.as_dict()
        if "content" in out:
            self._out_content.append(out["content"])
        if "reasoning_content" in out:
            self._out_reasoning.append(out["reasoning_content"])
        self._out_calls += out.get("tool_calls", [])
        return out

    def _run(self, delta: "_Delta", final: bool) -> None:
        while True:
            if self.state == self.START:
                if not self._start(final):
                    return
            elif self.state == self.REASONING:
                if not self._reason(delta, final):
                    return
            elif self.state == self.CONTENT:
                if not self._text(delta, final):
                    return
            elif not self._block(delta, final):
                return

    def _start(self, final: bool) -> bool:
        s = self.buf.lstrip(_WS)
        if s.startswith(THINK_OPEN):
            self.buf = s[len(THINK_OPEN):]
            self.state = self.REASONING
            self.reasoning_seen = True
            return True
        if not final and (not s or THINK_OPEN.startswith(s)):
            return False  # undecided: wait for more text
        self.state = self.CONTENT
        return True

    def _reason(self, delta: "_Delta", final: bool) -> bool:
        end = self.buf.find(THINK_CLOSE)
        if end >= 0:
            delta.reasoning += self._reasoning.feed(self.buf[:end])
            self._reasoning.drop()
            self.buf = self.buf[end + len(THINK_CLOSE):]
            self.state = self.CONTENT
            self._content = self._new_content(lstrip=True)
            if not self.parse_tools:  # content after </think> is only left-stripped
                self._content.hold_ws = False
            return True
        keep = 0 if final else _partial_suffix(self.buf, THINK_CLOSE)
        delta.reasoning += self._reasoning.feed(self.buf[:len(self.buf) - keep])
        self.buf = self.buf[len(self.buf) - keep:]
        if final:
            self._reasoning.drop()
        return False

    def _text(self, delta: "_Delta", final: bool) -> bool:
        if not self.parse_tools:
            delta.content += self._content.feed(self.buf)
            self.buf = ""
            return False
        start = self.buf.find(CALLS_OPEN)
        if start >= 0:
            delta.content += self._content.feed(self.buf[:start])
            self.buf = self.buf[start + len(CALLS_OPEN):]
            self.state = self.BLOCK
            return True
        keep = 0 if final else _partial_suffix(self.buf, CALLS_OPEN)
        delta.content += self._content.feed(self.buf[:len(self.buf) - keep])
        self.buf = self.buf[len(self.buf) - keep:]
        if final:
            delta.content += self._content.release()
        return False

    def _block(self, delta: "_Delta", final: bool) -> bool:
        close = self.buf.find(CALLS_CLOSE)
        if close < 0 and not final:
            return False  # the block is only judged whole
        body = self.buf if close < 0 else self.buf[:close]
        rest = "" if close < 0 else self.buf[close + len(CALLS_CLOSE):]
        parsed = parse_calls_block(body, self.tool_names)
        if parsed is not None:
            self._content.drop()  # whitespace before the block
            for name, args in parsed:
                delta.tool_calls.append(_call(self.num_calls, name, args))
                self.num_calls += 1
            self._content = self._new_content(lstrip=True)
        else:  # malformed: the block is text
            raw = CALLS_OPEN + body + ("" if close < 0 else CALLS_CLOSE)
            delta.content += self._content.feed(raw)
        self.buf = rest
        self.state = self.CONTENT
        return True


class _Delta:
    def __init__(self):
        self.content = ""
        self.reasoning = ""
        self.tool_calls: list[dict] = []

    def as_dict(self) -> dict:
        out: dict[str, Any] = {}
        if self.reasoning:
            out["reasoning_content"] = self.reasoning
        if self.content:
            out["content"] = self.content
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        return out


# ---- request side --------------------------------------------------------------------------------------------------
@dataclass
class ToolSetup:
    """What a request's tools / tool_choice / response_format mean for this server."""

    prompt_tools: list[dict] | None = None  # bare function schemas for the chat template; None: no tools section
    tool_names: list[str] | None = None  # names the parser accepts
    parse_tools: bool = False
    guided: GuidedSpec | None = None

    def parser(self, parse_reasoning: bool = True) -> StreamParser:
        return StreamParser(self.tool_names, self.parse_tools, parse_reasoning)

    def parse(self, text: str, parse_reasoning: bool = True) -> ParsedOutput:
        return parse_output(text, self.tool_names, self.parse_tools, parse_reasoning)


def normalize_tools(tools: Any, param: str = "tools") -> list[dict]:
    """OpenAI tools [{"type": "function", "function": {...}}] (a bare function schema is accepted too) -> bare
    function schemas, validated: InvalidRequest names the field (tools[1].function.parameters: ...)."""
    if not isinstance(tools, list):
        raise InvalidRequest(f"{param}: must be a list of tools", param)
    out, names = [], set()
    for i, tool in enumerate(tools):
        where = f"{param}[{i}]"
        if not isinstance(tool, dict):
            raise InvalidRequest(f"{where}: must be an object, got {type(tool).__name__}", where)
        if "function" in tool or "type" in tool:
            if tool.get("type", "function") != "function":
                raise InvalidRequest(f"{where}.type: only 'function' tools are supported, got {tool.get('type')!r}",
                                     f"{where}.type")
            fn, where = tool.get("function"), f"{where}.function"
            if fn is None:
                raise InvalidRequest(f"{where}: is required", where)
        else:
            fn = tool
        check_function(fn, where)
        if fn["name"] in names:
            raise InvalidRequest(f"{where}.name: duplicate tool name {fn['name']!r}", f"{where}.name")
        names.add(fn["name"])
        out.append(fn)
    return out


def tool_setup(tools: Any, tool_choice: Any, response_format: Any = None, parallel_tool_calls: bool | None = None,
               *, guided: GuidedSpec | None = None) -> ToolSetup:
    """Validates tools / tool_choice / response_format (InvalidRequest names the field) and decides:
    tool_choice "none" (default without tools) -> no tools in the prompt, no parsing; "auto" (default with tools) ->
    tools in the prompt, output parsed; "required" or {"type": "function", "function": {"name": ...}} (a bare name
    string too, for gRPC) -> tools in the prompt and guided decoding forces the call. response_format
    json_object / json_schema -> guided decoding. `guided`: another guided spec of the request (vLLM's guided_json /
    guided_regex), which cannot be combined with these."""
    functions = normalize_tools(tools) if tools else []
    names = [f["name"] for f in functions]
    choice = _tool_choice(tool_choice, names)
    setup = ToolSetup()
    if functions and choice != "none":
        setup.prompt_tools, setup.tool_names, setup.parse_tools = functions, names, True
        if choice == "required":
            setup.guided = GuidedSpec.tool_call(functions, parallel=parallel_tool_calls is not False)
        elif choice != "auto":
            setup.guided = GuidedSpec.tool_call([functions[names.index(choice)]], parallel=False)
    fmt = response_format_spec(response_format)
    already = "a forced tool_choice"
    for other in (fmt, guided):
        if other is None:
            continue
        if setup.guided is not None:
            raise InvalidRequest(f"{other.param}: cannot be combined with {already}", other.param)
        setup.guided, already = other, other.param.split(".")[0]
    return setup


def _tool_choice(choice: Any, names: list[str]) -> str:
    """-> "none" | "auto" | "required" | a tool name."""
    if choice is None or choice == "":
        return "auto" if names else "none"
    if isinstance(choice, str):
        if choice in ("none", "auto", "required"):
            if choice == "required" and not names:
                raise InvalidRequest("tool_choice: 'required' needs tools", "tool_choice")
            return choice
        name = choice  # gRPC: a bare function name
    elif isinstance(choice, dict):
        fn = choice.get("function")
        if choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise InvalidRequest("tool_choice: must be 'none', 'auto', 'required' or "
                                 "{'type': 'function', 'function': {'name': ...}}", "tool_choice")
        name = fn["name"]
    else:
        raise InvalidRequest("tool_choice: must be a string or an object", "tool_choice")
    if name not in names:
        raise InvalidRequest(f"tool_choice: function {name!r} is not among the request's tools", "tool_choice")
    return name


def response_format_spec(fmt: Any, param: str = "response_format") -> GuidedSpec | None:
    """OpenAI response_format -> GuidedSpec (None for text / unset)."""
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise InvalidRequest(f"{param}: must be an object", param)
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return GuidedSpec.json_object(param)
    if kind == "json_schema":
        js = fmt.get("json_schema")
        if not isinstance(js, dict):
            raise InvalidRequest(f"{param}.json_schema: is required for type 'json_schema' "
                                 "({'name': ..., 'schema': {...}, 'strict': ...})", f"{param}.json_schema")
        if "name" in js and not isinstance(js["name"], str):
            raise InvalidRequest(f"{param}.json_schema.name: must be a string", f"{param}.json_schema.name")
        schema = js.get("schema", {"type": "object"})  # no schema: any JSON object
        check_json_schema(schema, f"{param}.json_schema.schema")
        return GuidedSpec.json_schema(schema, f"{param}.json_schema.schema")
    raise InvalidRequest(f"{param}.type: must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                         f"{param}.type")
