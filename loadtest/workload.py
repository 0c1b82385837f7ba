"""Load-test profiles: a weighted mix of request scenarios read from loadtest/profiles/*.json (or .yaml).

Pure Python (no locust, no requests), so tests and `loadtest.run` can import it.

A profile:

    {
      "description": "free text",
      "defaults": {"max_tokens": 64, "temperature": 0.0, "ignore_eos": true, "unique_prefix": true,
                   "extra_body": {"return_token_ids": true}},
      "scenarios": [
        {"name": "short_chat", "weight": 6, "prompt_words": [8, 48], "max_tokens": [16, 64]},
        {"name": "long_context", "weight": 2, "system": "...", "prompt_words": [1500, 3000],
         "prompt": "Summarise the text above.", "max_tokens": [64, 128]},
        {"name": "tool_call", "weight": 2, "tools": [...], "tool_choice": "auto", "history": [...],
         "prompt": "What is the weather in Paris?", "max_tokens": [32, 96]}
      ]
    }

Scenario keys (any of them may also sit in "defaults"):
- name (required), weight (default 1): scenarios are drawn with probability weight / sum of weights.
- prompt_words: N or [lo, hi] (uniform, inclusive): filler words put in the last user message, to set the prompt
  length (a word is 1-3 tokens, depending on the tokenizer).
- prompt: text appended after the filler (the actual question).
- system: a system message. history: messages that come before the last user message (e.g. an earlier assistant
  turn with tool_calls and the tool's answer), OpenAI format.
- tools / tool_choice: sent as-is in the OpenAI request (the tool-calling request shape).
- max_tokens: N or [lo, hi]. temperature, top_p (optional). ignore_eos (default true: every request then generates
  exactly max_tokens tokens, so the load does not depend on when a model happens to emit EOS).
- unique_prefix (default true): starts the last user message with "Request <n>." so that no two prompts share a
  prefix beyond the system message (no prefix-cache hits unless the profile wants them).
- extra_body: extra fields merged into the HTTP request body (default: return_token_ids, the vLLM extension that
  m1serve supports, which gives exact per-chunk token counts; set {} for servers without it).

The gRPC API has no chat or tools fields: a gRPC request sends the same conversation rendered as plain text
("role: content" lines, the tools as JSON), so its prompt token count differs a little from the HTTP one.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"

_FILLER = ("the of and to in is was for on that with as by at from this it be are or have an which not but had "
           "they their one all were we can there more has been when who will no if out so what up about into "
           "than them some could time these two may then do first any my now such like other how over only new "
           "system model token expert layer request server latency throughput cluster shard batch cache").split()

_SCENARIO_KEYS = {"name", "weight", "prompt_words", "prompt", "system", "history", "tools", "tool_choice",
                  "max_tokens", "temperature", "top_p", "ignore_eos", "unique_prefix", "extra_body"}


class ProfileError(ValueError):
    pass


def _range(value, what: str) -> tuple[int, int]:
    if isinstance(value, bool):
        raise ProfileError(f"{what}: expected an integer or [lo, hi], got {value!r}")
    if isinstance(value, int):
        lo = hi = value
    elif isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        lo, hi = value
    else:
        raise ProfileError(f"{what}: expected an integer or [lo, hi], got {value!r}")
    if lo < 0 or hi < lo:
        raise ProfileError(f"{what}: bad range {value!r}")
    return lo, hi


@dataclass
class Scenario:
    name: str
    weight: float
    prompt_words: tuple[int, int]
    max_tokens: tuple[int, int]
    prompt: str = ""
    system: str | None = None
    history: list[dict] = field(default_factory=list)
    tools: list[dict] | None = None
    tool_choice: Any = None
    temperature: float = 0.0
    top_p: float | None = None
    ignore_eos: bool = True
    unique_prefix: bool = True
    extra_body: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, spec: dict, defaults: dict) -> "Scenario":
        merged = {**defaults, **spec}
        unknown = set(merged) - _SCENARIO_KEYS
        if unknown:
            raise ProfileError(f"scenario {spec.get('name')!r}: unknown keys {sorted(unknown)}")
        name = merged.get("name")
        if not isinstance(name, str) or not name:
            raise ProfileError(f"every scenario needs a name, got {spec!r}")
        weight = merged.get("weight", 1)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight < 0:
            raise ProfileError(f"scenario {name!r}: weight must be a number >= 0")
        max_tokens = _range(merged.get("max_tokens", 64), f"{name}.max_tokens")
        if max_tokens[0] < 1:
            raise ProfileError(f"scenario {name!r}: max_tokens must be >= 1")
        history = merged.get("history") or []
        if not isinstance(history, list) or not all(isinstance(m, dict) and "role" in m for m in history):
            raise ProfileError(f"scenario {name!r}: history must be a list of messages with a role")
        tools = merged.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise ProfileError(f"scenario {name!r}: tools must be a list")
        extra = merged.get("extra_body", {"return_token_ids": True})
        if not isinstance(extra, dict):
            raise ProfileError(f"scenario {name!r}: extra_body must be an object")
        return cls(name=name, weight=float(weight), prompt_words=_range(merged.get("prompt_words", 0),
                                                                        f"{name}.prompt_words"),
                   max_tokens=max_tokens, prompt=str(merged.get("prompt", "")), system=merged.get("system"),
                   history=history, tools=tools, tool_choice=merged.get("tool_choice"),
                   temperature=float(merged.get("temperature", 0.0)), top_p=merged.get("top_p"),
                   ignore_eos=bool(merged.get("ignore_eos", True)),
                   unique_prefix=bool(merged.get("unique_prefix", True)), extra_body=extra)


@dataclass
class Request:
    """One drawn request, transport-neutral."""

    scenario: str
    messages: list[dict]
    max_tokens: int
    temperature: float
    top_p: float | None
    ignore_eos: bool
    tools: list[dict] | None = None
    tool_choice: Any = None
    extra_body: dict = field(default_factory=dict)

    def chat_body(self, model: str) -> dict:
        """The OpenAI /v1/chat/completions body, streaming with a final usage chunk."""
        body = {"model": model, "messages": self.messages, "max_tokens": self.max_tokens,
                "temperature": self.temperature, "stream": True, "stream_options": {"include_usage": True},
                "ignore_eos": self.ignore_eos, **self.extra_body}
        if self.top_p is not None:
            body["top_p"] = self.top_p
        if self.tools is not None:
            body["tools"] = self.tools
        if self.tool_choice is not None:
            body["tool_choice"] = self.tool_choice
        return body

    def text(self) -> str:
        """The conversation as one plain-text prompt (for APIs without chat messages, i.e. gRPC)."""
        lines = []
        if self.tools:
            lines.append("tools: " + json.dumps(self.tools, separators=(",", ":")))
        for m in self.messages:
            content = m.get("content")
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            if m.get("tool_calls"):
                content = (content or "") + json.dumps(m["tool_calls"], separators=(",", ":"))
            lines.append(f"{m['role']}: {content or ''}")
        lines.append("assistant:")
        return "\n".join(lines)


class Profile:
    def __init__(self, name: str, scenarios: list[Scenario], description: str = ""):
        if not scenarios:
            raise ProfileError(f"profile {name!r} has no scenarios")
        if sum(s.weight for s in scenarios) <= 0:
            raise ProfileError(f"profile {name!r}: the weights sum to 0")
        if len({s.name for s in scenarios}) != len(scenarios):
            raise ProfileError(f"profile {name!r}: scenario names must be unique")
        self.name, self.scenarios, self.description = name, scenarios, description
        self._counter = 0

    @classmethod
    def from_dict(cls, name: str, spec: dict) -> "Profile":
        if not isinstance(spec, dict) or not isinstance(spec.get("scenarios"), list):
            raise ProfileError(f"profile {name!r}: expected an object with a 'scenarios' list")
        defaults = spec.get("defaults", {})
        if not isinstance(defaults, dict):
            raise ProfileError(f"profile {name!r}: defaults must be an object")
        defaults = {k: v for k, v in defaults.items() if k not in ("name", "weight")}
        return cls(name, [Scenario.from_dict(s, defaults) for s in spec["scenarios"]], spec.get("description", ""))

    @classmethod
    def load(cls, name_or_path: str | Path) -> "Profile":
        path = resolve(name_or_path)
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ProfileError(f"{path}: reading YAML profiles needs PyYAML (pip install pyyaml)") from None
            spec = yaml.safe_load(text)
        else:
            try:
                spec = json.loads(text)
            except json.JSONDecodeError as e:
                raise ProfileError(f"{path}: {e}") from None
        return cls.from_dict(path.stem, spec)

    def draw(self, rng: random.Random) -> Request:
        s = rng.choices(self.scenarios, weights=[x.weight for x in self.scenarios])[0]
        self._counter += 1
        parts = []
        if s.unique_prefix:
            parts.append(f"Request {self._counter}-{rng.randrange(1 << 30)}.")
        n_words = rng.randint(*s.prompt_words)
        if n_words:
            parts.append(" ".join(rng.choice(_FILLER) for _ in range(n_words)))
        if s.prompt:
            parts.append(s.prompt)
        messages = ([{"role": "system", "content": s.system}] if s.system else []) + [dict(m) for m in s.history]
        messages.append({"role": "user", "content": "\n\n".join(parts) or "Hello"})
        return Request(scenario=s.name, messages=messages, max_tokens=rng.randint(*s.max_tokens),
                       temperature=s.temperature, top_p=s.top_p, ignore_eos=s.ignore_eos, tools=s.tools,
                       tool_choice=s.tool_choice, extra_body=dict(s.extra_body))


def resolve(name_or_path: str | Path) -> Path:
    """A profile name (loadtest/profiles/NAME.json|yaml|yml) or a path to a profile file."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    for suffix in (".json", ".yaml", ".yml"):
        candidate = PROFILES_DIR / f"{name_or_path}{suffix}"
        if candidate.is_file():
            return candidate
    known = sorted(x.stem for x in PROFILES_DIR.glob("*") if x.suffix in (".json", ".yaml", ".yml"))
    raise ProfileError(f"no profile {str(name_or_path)!r}: not a file, and not one of {known}")
