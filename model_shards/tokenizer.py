"""MiniMax-M1 tokenizer: byte-level BPE via HF `tokenizers`, the chat template, streaming detokenization."""

import json
from pathlib import Path

from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

EOS_TOKEN = "<end_of_sentence>"

# MiniMax-M1's chat layout. It renders exactly what the chat_template in MiniMax-AI/MiniMax-M1's
# tokenizer_config.json renders (tool instruction with quoted "name"/"arguments", as in the GitHub version;
# model.md §7 notes an older variant without the quotes), and also renders assistant `tool_calls` and
# tool results that carry a name per part. It expects messages normalised by Tokenizer.apply_chat_template:
# content is a list of {"type": "text", "text": ...} parts (tool parts also have "name").
DEFAULT_CHAT_TEMPLATE = r"""
{{- '<begin_of_document>' -}}
{%- set ns = namespace(system='') -%}
{%- for message in messages -%}
    {%- if message['role'] == 'system' -%}
        {%- set ns.system = ns.system + message['content'][0]['text'] -%}
    {%- endif -%}
{%- endfor -%}
{%- if ns.system != '' -%}
    {{- '<beginning_of_sentence>system ai_setting=assistant\n' + ns.system + '<end_of_sentence>\n' -}}
{%- endif -%}
{%- if tools -%}
    {{- '<beginning_of_sentence>system tool_setting=tools\nYou are provided with these tools:\n<tools>\n' -}}
    {%- for tool in tools -%}
        {{- tool | tojson ~ '\n' -}}
    {%- endfor -%}
    {{- '</tools>\n\nIf you need to call tools, please respond with <tool_calls></tool_calls> XML tags, and provide tool-name and json-object of arguments, following the format below:\n<tool_calls>\n{"name": <tool-name-1>, "arguments": <args-json-object-1>}\n...\n</tool_calls><end_of_sentence>\n' -}}
{%- endif -%}
{%- for message in messages -%}
    {%- if message['role'] == 'user' -%}
        {{- '<beginning_of_sentence>user name=user\n' + message['content'][0]['text'] + '<end_of_sentence>\n' -}}
    {%- elif message['role'] == 'assistant' -%}
        {%- set text = message['content'] | map(attribute='text') | join -%}
        {{- '<beginning_of_sentence>ai name=assistant\n' + text -}}
        {%- if message['tool_calls'] -%}
            {%- if text and not text.endswith('\n') -%}
                {{- '\n' -}}
            {%- endif -%}
            {{- '<tool_calls>\n' -}}
            {%- for call in message['tool_calls'] -%}
                {%- set args = call['function']['arguments'] -%}
                {%- if args is not string -%}
                    {%- set args = args | tojson -%}
                {%- endif -%}
                {{- '{"name": ' ~ (call['function']['name'] | tojson) ~ ', "arguments": ' ~ args ~ '}\n' -}}
            {%- endfor -%}
            {{- '</tool_calls>' -}}
        {%- endif -%}
        {{- '<end_of_sentence>\n' -}}
    {%- elif message['role'] == 'tool' -%}
        {{- '<beginning_of_sentence>tool name=tools\n' -}}
        {%- for part in message['content'] -%}
            {{- 'tool name: ' + part['name'] + '\ntool result: ' + part['text'] + '\n\n' -}}
        {%- endfor -%}
        {{- '<end_of_sentence>\n' -}}
    {%- elif message['role'] != 'system' -%}
        {{- raise_exception('Unknown message role: ' ~ message['role']) -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<beginning_of_sentence>ai name=assistant\n' -}}
{%- endif -%}
"""

ROLES = ("system", "user", "assistant", "tool")


class TokenizerError(ValueError):
    pass


def _read_json(path: Path, required: bool = True) -> dict | None:
    if not path.is_file():
        if required:
            raise TokenizerError(f"{path}: file not found")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_str(value, path: Path, field: str) -> str | None:
    # HF stores special tokens either as plain strings or as serialised AddedToken dicts.
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"{path}: field {field!r} must be a string or {{'content': ...}}, got {value!r}")


def _raise_exception(message):
    raise TokenizerError(f"chat template error: {message}")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Like transformers' chat-template tojson: no HTML escaping (jinja2's built-in escapes <, >, &, ').
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _text_parts(content, where: str) -> list[dict]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise TokenizerError(f"{where}: content must be a string or a list of text parts, got {type(content).__name__}")
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise TokenizerError(f"{where}: content part {j} ({kind!r}) is not a text part "
                                 "{'type': 'text', 'text': str}; only text is supported")
    return content


def _normalize_tool_call(call, where: str) -> dict:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise TokenizerError(f"{where}: tool call must look like "
                             "{'id': ..., 'type': 'function', 'function': {'name': str, 'arguments': str}}")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        # Re-dump parsed arguments so spacing matches what the model itself emits (json.dumps defaults).
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            pass  # keep the client's text verbatim
    return {"id": call.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": args}}


def normalize_messages(messages: list[dict]) -> list[dict]:
    """OpenAI-style messages -> the shape MiniMax's template indexes (content[0]['text'], named tool parts).

    Text parts of a system/user/assistant message are joined into one part (MiniMax's template only reads
    the first). Consecutive tool messages become one tool block with one named part per result, the layout
    of MiniMax's function-call guide; a result's name comes from the part, the message's "name", or the
    assistant tool call whose id matches "tool_call_id".
    """
    if not isinstance(messages, list):
        raise TokenizerError(f"messages must be a list, got {type(messages).__name__}")
    out: list[dict] = []
    call_names: dict[str, str] = {}
    for i, msg in enumerate(messages):
        where = f"message {i}"
        if not isinstance(msg, dict):
            raise TokenizerError(f"{where}: expected a dict, got {type(msg).__name__}")
        role = msg.get("role")
        if role not in ROLES:
            raise TokenizerError(f"{where}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        parts = _text_parts(msg.get("content"), where)
        if role == "tool":
            name = msg.get("name") or call_names.get(msg.get("tool_call_id"), "")
            parts = [{"type": "text", "text": p["text"], "name": p.get("name") or name} for p in parts]
            parts = parts or [{"type": "text", "text": "", "name": name}]
            if out and out[-1]["role"] == "tool":
                out[-1]["content"].extend(parts)
            else:
                out.append({"role": "tool", "content": parts})
            continue
        norm = {"role": role, "content": [{"type": "text", "text": "".join(p["text"] for p in parts)}]}
        if role == "assistant":
            calls = msg.get("tool_calls") or []
            if not isinstance(calls, list):
                raise TokenizerError(f"{where}: tool_calls must be a list")
            norm["tool_calls"] = [_normalize_tool_call(c, where) for c in calls]
            for c in norm["tool_calls"]:
                if c["id"] is not None:
                    call_names[c["id"]] = c["function"]["name"]
        out.append(norm)
    return out


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, config: dict | None = None, chat_template: str | None = None,
                 extra_stop_token_ids=()):
        config = config or {}
        self._tok = tokenizer
        self.bos_token = config.get("bos_token")
        self.eos_token = config.get("eos_token") or EOS_TOKEN
        self.unk_token = config.get("unk_token")
        self.model_max_length = config.get("model_max_length")
        self.chat_template = chat_template or DEFAULT_CHAT_TEMPLATE
        eos_id = tokenizer.token_to_id(self.eos_token)
        if eos_id is None:
            raise TokenizerError(f"eos token {self.eos_token!r} is not in the tokenizer vocabulary")
        self.eos_token_id: int = eos_id
        self.stop_token_ids: set[int] = {eos_id, *extra_stop_token_ids}
        self._template = None

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise TokenizerError(f"{tok_file}: file not found")
        try:
            tok = HFTokenizer.from_file(str(tok_file))
        except Exception as e:
            _read_json(tok_file)  # raises the clearer "invalid JSON" message if that is the problem
            raise TokenizerError(f"{tok_file}: not a valid tokenizers file ({e})") from e

        cfg_file = path / "tokenizer_config.json"
        raw = _read_json(cfg_file)
        config = {k: _token_str(raw.get(k), cfg_file, k) for k in ("bos_token", "eos_token", "unk_token")}
        config["model_max_length"] = raw.get("model_max_length")

        template = raw.get("chat_template")
        if isinstance(template, list):  # HF's named-templates form
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if template is not None and not isinstance(template, str):
            raise TokenizerError(f"{cfg_file}: chat_template must be a string")
        jinja_file = path / "chat_template.jinja"  # newer transformers save the template here instead
        if jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")

        added = raw.get("added_tokens_decoder") or {}
        if not isinstance(added, dict):
            raise TokenizerError(f"{cfg_file}: added_tokens_decoder must be an object")
        for id_str, spec in added.items():
            content = _token_str(spec, cfg_file, f"added_tokens_decoder[{id_str}]")
            if content is None:
                raise TokenizerError(f"{cfg_file}: added_tokens_decoder[{id_str}] has no content")
            if tok.token_to_id(content) is None:
                special = bool(spec.get("special", True)) if isinstance(spec, dict) else True
                token = AddedToken(content, special=special, normalized=False)
                if special:
                    tok.add_special_tokens([token])
                else:
                    tok.add_tokens([token])
            if str(tok.token_to_id(content)) != str(id_str):
                raise TokenizerError(f"{cfg_file}: added token {content!r} has id {id_str} but "
                                     f"id {tok.token_to_id(content)} in {tok_file.name}")

        extra_stop = []
        gen = _read_json(path / "generation_config.json", required=False)
        if gen is not None:
            eos = gen.get("eos_token_id")
            extra_stop = [eos] if isinstance(eos, int) else [i for i in (eos or []) if isinstance(i, int)]
        try:
            return cls(tok, config, template, extra_stop)
        except TokenizerError as e:
            raise TokenizerError(f"{cfg_file}: {e}") from e

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None,
                            add_generation_prompt: bool = True) -> str:
        """Render messages (OpenAI shape; string or text-part content) to the prompt string.

        `tools` are rendered one JSON object per line exactly as given (MiniMax's own examples pass the
        bare function schema {"name", "description", "parameters"}).
        """
        if self._template is None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise_exception
            try:
                self._template = env.from_string(self.chat_template)
            except Exception as e:
                raise TokenizerError(f"chat template does not compile: {e}") from e
        try:
            return self._template.render(messages=normalize_messages(messages), tools=tools,
                                         add_generation_prompt=add_generation_prompt, bos_token=self.bos_token,
                                         eos_token=self.eos_token, unk_token=self.unk_token)
        except TokenizerError:
            raise
        except Exception as e:
            raise TokenizerError(f"chat template rendering failed: {type(e).__name__}: {e}") from e


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas, one token at a time.

    Keeps a small window of ids: [prefix_offset, read_offset) is already-emitted text used as context, the
    rest is pending. A byte-level token can end mid-character, so text ending in U+FFFD is held back until
    the character completes. The window is only cut where the decoded text is complete, so the joined
    deltas equal tokenizer.decode(all_generated_ids).
    """

    CONTEXT_TOKENS = 5

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_ids[-self.CONTEXT_TOKENS:]) if prompt_ids else []
        if context and self._decode(context).endswith("\ufffd"):
            context = []  # prompt ends mid-character: its bytes would merge with the first generated ones
        self.ids = context
        self.prefix_offset = 0
        self.read_offset = len(context)

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _delta(self) -> tuple[str, str]:
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        return prefix_text, new_text

    def _advance(self):
        self.ids = self.ids[self.read_offset:]  # drop context that is no longer needed
        self.prefix_offset, self.read_offset = 0, len(self.ids)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text, new_text = self._delta()
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        self._advance()
        return new_text[len(prefix_text):]

    def flush(self) -> str:
        prefix_text, new_text = self._delta()
        self._advance()
        return new_text[len(prefix_text):]
