"""A checkpoint's own Jinja chat template, rendered and encoded the way transformers does it.

What it is: ``load_chat_template(model_dir)`` reads the template a Hugging Face checkpoint ships
(``chat_template.jinja``, else ``chat_template`` in tokenizer_config.json: a string, or a list of
``{"name", "template"}`` of which "default" is used) and returns a ``ChatTemplate`` that renders
messages to text in the same sandboxed Jinja environment as transformers 5
(``transformers.utils.chat_template_utils``: ``ImmutableSandboxedEnvironment`` with
``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, ``raise_exception``, ``strftime_now``, a
``tojson`` that does not escape HTML), and encodes that text to ids the way
``apply_chat_template(tokenize=True)`` does for a sentencepiece (Llama-style) tokenizer.

What it is not: it does not import transformers, and it knows nothing about models. It does not
support tools, documents, ``continue_final_message`` or ``{% generation %}`` masks.

How the text becomes ids (transformers 5's ``LlamaTokenizer``): the rendered text is split at
special-token strings (bos/eos/unk/pad..., control pieces of tokenizer.model, and every token in
tokenizer_config's ``added_tokens_decoder``), each of which becomes its id. Each text piece in
between is encoded with sentencepiece. Where a piece gets sentencepiece's leading "▁" depends on
the Metaspace ``prepend_scheme`` transformers builds: with ``"legacy": true`` in
tokenizer_config.json (Mixtral-8x7B-Instruct's setting) every piece gets one (``</s>[INST]`` is
``</s>``, ``▁[INST]``), without it (transformers 5's default, ``legacy=False``) only text at the
very start of the string does (``<s>[INST]`` is ``<s>``, ``[INST]``). A piece that already starts
with a space never gets a second "▁" (sentencepiece alone would give "▁▁").
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from offload.errors import TokenizerError
from offload.tokenizer import read_json_object

if TYPE_CHECKING:
    from offload.tokenizer import Message, Tokenizer

__all__ = ["ChatTemplate", "load_chat_template"]

# The named special tokens transformers 5 passes to every template (``special_tokens_map``).
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                       "cls_token", "mask_token")


@dataclass(frozen=True)
class ChatTemplate:
    """One Jinja chat template plus what the checkpoint's tokenizer_config.json says around it.

    ``special_tokens``: the template variables ``bos_token``, ``eos_token``... (strings).
    ``added_tokens``: content -> id from ``added_tokens_decoder``. ``legacy``/``add_prefix_space``:
    tokenizer_config's settings that decide where sentencepiece's leading "▁" goes.
    ``source``: the file the template came from (named in errors).
    """

    template: str
    source: str
    special_tokens: Mapping[str, str]
    added_tokens: Mapping[str, int]
    legacy: bool = False
    add_prefix_space: bool = True

    # ---- text ----------------------------------------------------------------------------

    def render(self, messages: Sequence[Message] | Sequence[Mapping[str, Any]],
               add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """The conversation as text, exactly as transformers' ``apply_chat_template(tokenize=False)``.

        Extra keyword arguments become template variables (they override the special tokens).
        A ``raise_exception`` in the template, or any other template error, is a TokenizerError.
        """
        import jinja2

        chat = [_message_dict(m) for m in messages]
        variables = {**self.special_tokens, **_plain(kwargs)}
        try:
            return _compile(self.template).render(
                messages=chat, tools=None, documents=None,
                add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as e:
            raise TokenizerError(f"{self.source}: chat template: {e.message or e}") from None

    # ---- ids -----------------------------------------------------------------------------

    def encode(self, tokenizer: Tokenizer, messages: Sequence[Message] | Sequence[Mapping[str, Any]],
               add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
        """Ids of the rendered conversation, as ``apply_chat_template(tokenize=True)`` gives them.

        Special-token strings the template writes (and any in message text: transformers does not
        sanitize them by default) become their ids; no bos is added beyond what the template writes.
        """
        text = self.render(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        return self.encode_text(tokenizer, text)

    def encode_text(self, tokenizer: Tokenizer, text: str) -> list[int]:
        """Ids of already rendered chat text (see the module docstring for the "▁" rule)."""
        sp = tokenizer._sp
        special = self._special_ids(tokenizer)
        pattern = re.compile("|".join(re.escape(s) for s in sorted(special, key=len, reverse=True)))
        ids: list[int] = []
        pos = 0
        for m in pattern.finditer(text):
            if m.start() > pos:
                ids += self._encode_piece(sp, text[pos:m.start()], at_start=pos == 0)
            ids.append(special[m.group()])
            pos = m.end()
        if pos < len(text):
            ids += self._encode_piece(sp, text[pos:], at_start=pos == 0)
        return ids

    def _special_ids(self, tokenizer: Tokenizer) -> dict[str, int]:
        sp = tokenizer._sp
        out: dict[str, int] = {}
        for i in tokenizer._control:  # <s>, </s> (and <unk>, which sentencepiece marks unknown)
            out[sp.id_to_piece(i)] = i
        if sp.unk_id() >= 0:
            out[sp.id_to_piece(sp.unk_id())] = sp.unk_id()
        for content in self.special_tokens.values():
            tid = self.added_tokens.get(content, sp.piece_to_id(content))
            if content and (tid != sp.unk_id() or content == sp.id_to_piece(sp.unk_id())):
                out[content] = tid
        out.update(self.added_tokens)
        for content, tid in out.items():
            if not 0 <= tid < tokenizer.vocab_size:
                raise TokenizerError(f"{self.source}: token {content!r} has id {tid}, outside the "
                                     f"vocabulary [0, {tokenizer.vocab_size})")
        return {k: v for k, v in out.items() if k}

    def _encode_piece(self, sp, piece: str, *, at_start: bool) -> list[int]:
        prefix = self.add_prefix_space and (self.legacy or at_start)
        if piece.startswith(" "):
            prefix = False  # the space itself becomes the "▁"; transformers adds no second one
        if prefix:
            return sp.encode(piece)
        # sentencepiece always adds its "▁": encode after a newline and drop the newline's ids,
        # the trick transformers itself uses (chat_template_utils._encode_chat_piece).
        newline = sp.encode("\n")
        ids = sp.encode("\n" + piece)
        if ids[:len(newline)] == newline:
            return ids[len(newline):]
        return sp.encode(piece)


def load_chat_template(model_dir: str | Path) -> ChatTemplate | None:
    """The checkpoint's default chat template, or None when it ships none.

    ``chat_template.jinja`` takes priority over tokenizer_config.json's ``chat_template`` (as in
    transformers 5). Malformed files and templates that do not compile are TokenizerErrors.
    """
    import jinja2

    model_dir = Path(model_dir)
    cfg_path = model_dir / "tokenizer_config.json"
    cfg = read_json_object(cfg_path) or {}
    jinja_path = model_dir / "chat_template.jinja"
    if jinja_path.is_file():
        try:
            template, source = jinja_path.read_text(encoding="utf-8"), str(jinja_path)
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{jinja_path}: cannot read ({e})") from None
    else:
        template, source = _config_template(cfg.get("chat_template"), cfg_path), str(cfg_path)
        if template is None:
            return None

    special: dict[str, str] = {}
    for key in _SPECIAL_TOKEN_KEYS:
        value = cfg.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if value is not None:
            if not isinstance(value, str):
                raise TokenizerError(f"{cfg_path}: {key} must be a string or {{\"content\": ...}}")
            special[key] = value
    added: dict[str, int] = {}
    for key, entry in (cfg.get("added_tokens_decoder") or {}).items():
        try:
            added.setdefault(entry["content"], int(key))
        except (KeyError, TypeError, ValueError):
            raise TokenizerError(f"{cfg_path}: malformed added_tokens_decoder entry {key!r}") from None

    try:
        _compile(template)
    except jinja2.TemplateError as e:
        raise TokenizerError(f"{source}: chat template does not compile: {e.message or e}") from None
    legacy = cfg.get("legacy")
    add_prefix_space = cfg.get("add_prefix_space")
    return ChatTemplate(template=template, source=source, special_tokens=special,
                        added_tokens=added, legacy=bool(legacy) if legacy is not None else False,
                        add_prefix_space=bool(add_prefix_space) if add_prefix_space is not None
                        else True)


# ---- internals -------------------------------------------------------------------------------

def _config_template(value, path: Path) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        by_name = {}
        for entry in value:
            if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                    and isinstance(entry.get("template"), str)):
                raise TokenizerError(f"{path}: chat_template list entries must be "
                                     "{\"name\": ..., \"template\": ...}")
            by_name[entry["name"]] = entry["template"]
        if "default" not in by_name:
            raise TokenizerError(f"{path}: chat_template has no \"default\" template "
                                 f"(only {sorted(by_name)})")
        return by_name["default"]
    raise TokenizerError(f"{path}: chat_template must be a string or a list of "
                         "{\"name\": ..., \"template\": ...}")


def _message_dict(message) -> dict:
    """A message as the plain dict a template sees; keys whose value is None are dropped."""
    if is_dataclass(message) and not isinstance(message, type):
        message = {f.name: getattr(message, f.name) for f in fields(message)}
    if not isinstance(message, Mapping):
        raise TokenizerError(f"chat template: expected a Message or a dict, got {message!r}")
    return {k: v for k, v in _plain(dict(message)).items() if v is not None}


def _plain(value):
    """Only plain JSON types reach the sandbox (transformers' ``_plain_template_data``)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    return f"<{type(value).__name__}>"


_compiled: dict[str, Any] = {}


def _compile(template: str):
    """The template compiled in transformers 5's sandbox (cached by its text)."""
    compiled = _compiled.get(template)
    if compiled is None:
        compiled = _environment().from_string(template)
        _compiled[template] = compiled
    return compiled


_env = None


def _environment():
    global _env
    if _env is not None:
        return _env
    import jinja2
    import jinja2.ext
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; transformers' does not.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore-prefixed attributes on a namespace "
                    f"({name!r})")

    class Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` renders its body (no assistant mask here)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    _env = env
    return env
