"""A checkpoint's own Jinja chat template, rendered and encoded the way transformers does it.

What it is: ``load_chat_template(model_dir)`` reads the template a Hugging Face checkpoint ships
(``chat_template.jinja``, else ``chat_template`` in tokenizer_config.json: a string, or a list of
``{"name", "template"}`` of which "default" is used) and returns a ``ChatTemplate`` that renders
messages to text in the same sandboxed Jinja environment as transformers 5
(``transformers.utils.chat_template_utils``: ``ImmutableSandboxedEnvironment`` with
``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, ``raise_exception``, ``strftime_now``, a
``tojson`` that does not escape HTML), and encodes that text to ids the way
``apply_chat_template(tokenize=True)`` does for a sentencepiece (Llama-style) tokenizer. A
tokenizer.json checkpoint's ``JsonTokenizer`` uses ``render`` only and encodes the text itself.
Only the default template is read: transformers 5's ``additional_chat_templates/`` folder of
named ones is not, nor ``chat_template.json`` (a processor's file, which tokenizers do not read).

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

Bounded work (a template is code from the checkpoint, so a hostile one must not hang or eat
memory): a template is at most ``TEMPLATE_MAX_CHARS`` characters (compiling is linear in that),
and rendering runs under a budget: at most ``RENDER_STEPS`` Python trace events (lines and calls
of the compiled template and of Jinja's runtime, counted with ``sys.settrace``, which catches any
loop, nested or recursive) and ``RENDER_SECONDS`` of wall time, at most ``RENDER_MAX_CHARS``
characters of output, and operations that make big values in one step refused before they run:
``*``, ``**``, ``+``, ``%`` and ``~`` whose result would exceed ``RENDER_MAX_CHARS`` characters,
``RENDER_MAX_ITEMS`` items or ``RENDER_MAX_INT_BITS`` bits; widths and counts given to str
methods, ``format`` and filters (``center``, ``indent``, ``replace``, ``join``, ``wordwrap``,
``sum``...) that would; and any call's result or namespace value over those sizes. A template
over budget, or failing in any way (a Jinja error, a Python exception, recursion), is a
TokenizerError naming the template's file. The budget is not a proof against every C-level
operation: it covers Jinja's operators, the str methods and filters listed, and Python-level work.
"""

from __future__ import annotations

import inspect
import json
import re
import sys
import time
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from offload.errors import TokenizerError, shown
from offload.tokenizer import added_tokens, check_text, read_json_object

if TYPE_CHECKING:
    from offload.tokenizer import Message, Tokenizer

__all__ = ["ChatTemplate", "load_chat_template"]

# The budget of one template (see the module docstring). Real chat templates are a few KiB and
# render in a few thousand steps; these leave them a thousandfold margin.
TEMPLATE_MAX_CHARS = 64 * 1024  # the template's source (compiling 64 KiB takes up to ~2 s)
RENDER_STEPS = 2_000_000  # trace events (~0.25 s on a 2020s CPU)
RENDER_SECONDS = 2.0  # wall time, checked every 1024 steps
RENDER_MAX_CHARS = 8 * 2**20  # the output, and any string made while rendering
RENDER_MAX_ITEMS = 2**20  # any list, tuple, dict or set made while rendering
RENDER_MAX_INT_BITS = 2**16  # any integer made by * or **

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
        A ``raise_exception`` in the template, any other error while rendering, or a render over
        its budget (module docstring) is a TokenizerError naming the template's file.
        """
        try:
            chat = [_message_dict(m) for m in messages]
            variables = {**self.special_tokens, **_plain(kwargs)}
            template = _compile_checked(self.template, self.source)
            return _render_within_budget(lambda: template.generate(
                messages=chat, tools=None, documents=None,
                add_generation_prompt=add_generation_prompt, **variables))
        except BaseException as e:  # noqa: B036 - _OverBudget is a BaseException on purpose
            raise _template_error(self.source, "chat template", e) from None

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
        check_text(text, self.source)
        special = self._special_ids(tokenizer)
        if not special:
            return self._encode_piece(sp, text, at_start=True) if text else []
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
    transformers 5). The special tokens come from tokenizer_config.json, else from
    special_tokens_map.json (transformers' fallback). Malformed files, fields of the wrong type,
    a template over ``TEMPLATE_MAX_CHARS`` and templates that do not compile are TokenizerErrors
    naming the file (and the field).
    """
    from offload.tokenizer import read_text_file

    model_dir = Path(model_dir)
    cfg_path = model_dir / "tokenizer_config.json"
    cfg = read_json_object(cfg_path) or {}
    jinja_path = model_dir / "chat_template.jinja"
    if jinja_path.exists() or jinja_path.is_symlink():
        template = read_text_file(jinja_path, TEMPLATE_MAX_CHARS * 4, "chat template")
        source = str(jinja_path)
    else:
        template, source = _config_template(cfg.get("chat_template"), cfg_path), str(cfg_path)
        if template is None:
            return None
    if len(template) > TEMPLATE_MAX_CHARS:
        raise TokenizerError(f"{source}: chat template of {len(template)} characters; at most "
                             f"{TEMPLATE_MAX_CHARS} are read")

    map_path = model_dir / "special_tokens_map.json"
    token_map = read_json_object(map_path) or {}
    special: dict[str, str] = {}
    for key in _SPECIAL_TOKEN_KEYS:
        where, value = (cfg_path, cfg.get(key)) if cfg.get(key) is not None else (map_path, token_map.get(key))
        if isinstance(value, dict):
            value = value.get("content")
        if value is not None:
            if not isinstance(value, str):
                raise TokenizerError(f"{where}: {key} must be a string or {{\"content\": \"...\"}}")
            check_text(value, f"{where}: {key}")
            special[key] = value
    added = added_tokens(cfg, cfg_path)

    _compile_checked(template, source)
    return ChatTemplate(template=template, source=source, special_tokens=special,
                        added_tokens=added, legacy=_optional_bool(cfg, "legacy", False, cfg_path),
                        add_prefix_space=_optional_bool(cfg, "add_prefix_space", True, cfg_path))


# ---- internals -------------------------------------------------------------------------------

def _optional_bool(cfg: dict, key: str, default: bool, path: Path) -> bool:
    value = cfg.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise TokenizerError(f"{path}: {key} must be true, false or null, got {_short(value)}")
    return value


def _short(value: object, limit: int = 60) -> str:
    """``offload.errors.shown`` on one line, at this module's limit."""
    return shown(value, limit, one_line=True)


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


def _compile_checked(template: str, source: str):
    """``_compile``, every failure a TokenizerError naming ``source``."""
    try:
        return _compile(template)
    except BaseException as e:  # noqa: B036 - _OverBudget is a BaseException on purpose
        raise _template_error(source, "chat template does not compile", e) from None


def _template_error(source: str, what: str, e: BaseException) -> BaseException:
    """The one-line TokenizerError for an exception out of compiling or rendering a template
    (KeyboardInterrupt, SystemExit and OffloadErrors pass through as they are)."""
    import jinja2

    from offload.errors import OffloadError

    if isinstance(e, (KeyboardInterrupt, SystemExit, OffloadError)):
        return e
    if isinstance(e, _OverBudget):
        reason = f"over its budget: {e}"
    elif isinstance(e, jinja2.TemplateError):
        reason = str(e.message or e)
    elif isinstance(e, RecursionError):
        reason = "recursion too deep"
    elif isinstance(e, MemoryError):
        reason = "out of memory"
    else:
        reason = f"{type(e).__name__}: {e}"
    reason = " ".join(reason.split())
    if len(reason) > 300:
        reason = reason[:297] + "..."
    return TokenizerError(f"{source}: {what}: {reason}")


# ---- the budget --------------------------------------------------------------------------------


class _OverBudget(BaseException):
    """A render went over its budget. A BaseException, so that nothing in Jinja's runtime (which
    catches Exception in places, constant folding included) can swallow it."""


def _render_within_budget(generate) -> str:
    """Join the pieces of ``generate()`` (a template's generator) under the step, time and output
    budgets: a trace function counts every call and line event of the Python code that runs."""
    steps = RENDER_STEPS
    deadline = time.monotonic() + RENDER_SECONDS

    def trace(frame, event, arg):
        nonlocal steps
        steps -= 1
        if steps & 1023 == 0:
            if steps <= 0:
                raise _OverBudget(f"more than {RENDER_STEPS} steps (a loop that does not end, or "
                                  "nests too deep)")
            if time.monotonic() > deadline:
                raise _OverBudget(f"more than {RENDER_SECONDS:g} s")
        return trace

    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        pieces, chars = [], 0
        for piece in generate():
            chars += len(piece)
            if chars > RENDER_MAX_CHARS:
                raise _OverBudget(f"more than {RENDER_MAX_CHARS} characters of output")
            pieces.append(piece)
    finally:
        sys.settrace(previous)
    return "".join(pieces)


def _too_big(what: str, size: int, limit: int, unit: str) -> _OverBudget:
    return _OverBudget(f"{what} would make {size} {unit}, more than {limit}")


def _check_size(value, what: str = "a value"):
    """``value`` when it is within the size limits; _OverBudget when not."""
    if isinstance(value, (str, bytes, bytearray)):
        if len(value) > RENDER_MAX_CHARS:
            raise _too_big(what, len(value), RENDER_MAX_CHARS, "characters")
    elif isinstance(value, (list, tuple, dict, set, frozenset)):
        if len(value) > RENDER_MAX_ITEMS:
            raise _too_big(what, len(value), RENDER_MAX_ITEMS, "items")
    elif isinstance(value, int) and value.bit_length() > RENDER_MAX_INT_BITS:
        raise _too_big(what, value.bit_length(), RENDER_MAX_INT_BITS, "bits")
    return value


def _text_len(value) -> int:
    return len(value) if isinstance(value, str) else len(str(value))


def _check_predicted(what: str, size: int, items: bool = False) -> None:
    limit = RENDER_MAX_ITEMS if items else RENDER_MAX_CHARS
    if size > limit:
        raise _too_big(what, size, limit, "items" if items else "characters")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_binop(op: str, left, right) -> None:
    """Refuse ``left op right`` before it runs when its result would be over the limits."""
    seqs = (str, bytes, list, tuple)
    if op == "*":
        if isinstance(left, seqs) and _is_int(right) or isinstance(right, seqs) and _is_int(left):
            seq, n = (left, right) if isinstance(left, seqs) else (right, left)
            _check_predicted(f"{type(seq).__name__} * {n}", len(seq) * max(n, 0),
                             items=isinstance(seq, (list, tuple)))
        elif _is_int(left) and _is_int(right) and left.bit_length() + right.bit_length() > RENDER_MAX_INT_BITS:
            raise _too_big("an integer product", left.bit_length() + right.bit_length(), RENDER_MAX_INT_BITS,
                           "bits")
    elif op == "**":
        if _is_int(left) and _is_int(right) and right > 0 and abs(left) > 1:
            bits = right * (abs(left).bit_length() - 1)
            if bits > RENDER_MAX_INT_BITS:
                raise _too_big("an integer power", bits, RENDER_MAX_INT_BITS, "bits")
    elif op == "+":
        if isinstance(left, seqs) and isinstance(right, seqs):
            _check_predicted("a concatenation", len(left) + len(right), items=isinstance(left, (list, tuple)))
    elif op == "%" and isinstance(left, str):
        _check_percent_format(left, right)


_PERCENT = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?(.)", re.DOTALL)


def _check_percent_format(fmt: str, args) -> None:
    """``fmt % args``: every width and precision, and the text it can make, within the limits."""
    values = list(args.values()) if isinstance(args, Mapping) else list(args) if isinstance(args, tuple) else [args]
    conversions = 0
    for m in _PERCENT.finditer(fmt):
        if m.group(3) == "%":
            continue
        conversions += 1
        for spec in (m.group(1), m.group(2)):
            if spec == "*":
                spec = max((v for v in values if _is_int(v)), default=0)
            if spec is not None and int(spec) > RENDER_MAX_CHARS:
                raise _too_big("a % format width", int(spec), RENDER_MAX_CHARS, "characters")
    widest = max((4 * _text_len(v) + 2 for v in values), default=0)  # %r of a str is at most 4x
    _check_predicted("a % format", len(fmt) + conversions * widest)


def _int_args(args, kwargs):
    return [v for v in (*args, *kwargs.values()) if _is_int(v)]


def _check_builtin_call(obj, args, kwargs) -> None:
    """A str/bytes/int method (C code: no trace events while it runs) asked for a big result."""
    for n in _int_args(args, kwargs):
        if abs(n) > RENDER_MAX_CHARS:
            raise _too_big(f"{getattr(obj, '__name__', 'a call')}({n})", abs(n), RENDER_MAX_CHARS, "characters")
    self, name = getattr(obj, "__self__", None), getattr(obj, "__name__", "")
    if not isinstance(self, (str, bytes)):
        return
    arg = (lambda i, key, default=None: args[i] if len(args) > i else kwargs.get(key, default))
    if name == "expandtabs":
        size = arg(0, "tabsize", 8)
        if _is_int(size):
            _check_predicted("expandtabs", len(self) + self.count("\t" if isinstance(self, str) else b"\t") * size)
    elif name == "replace":
        _check_replace(self, arg(0, "old"), arg(1, "new"), arg(2, "count", -1))
    elif name == "join":
        items = arg(0, "iterable")
        if isinstance(items, (list, tuple)):
            _check_predicted("join", len(self) * max(len(items) - 1, 0) + sum(_text_len(x) for x in items
                                                                              if isinstance(x, (str, bytes))))
    elif name == "translate":
        table = arg(0, "table")
        if isinstance(table, Mapping):
            widest = max((len(v) for v in table.values() if isinstance(v, (str, bytes))), default=1)
            _check_predicted("translate", len(self) * max(widest, 1))


def _check_replace(s, old, new, count) -> None:
    if isinstance(s, (str, bytes)) and isinstance(old, type(s)) and isinstance(new, type(s)):
        times = s.count(old) if old else len(s) + 1
        if _is_int(count) and count >= 0:
            times = min(times, count)
        _check_predicted("replace", len(s) + times * max(len(new) - len(old), 0))


def _budget_filter(name: str, func):
    """A filter that refuses arguments making a result over the limits, and checks its result."""
    import functools

    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        signature = None

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        bound = None
        if signature is not None:
            try:
                bound = signature.bind(*args, **kwargs).arguments
            except TypeError:
                bound = None  # the filter itself says what is wrong
        if bound is not None:
            _check_filter_args(name, bound)
        result = func(*args, **kwargs)
        return _check_size(result, f"filter {name}")

    return wrapper


def _check_filter_args(name: str, a: dict) -> None:
    for key, value in a.items():
        if key not in ("environment", "eval_ctx", "env", "value", "s", "iterable") and _is_int(value) \
                and abs(value) > RENDER_MAX_CHARS:
            raise _too_big(f"filter {name}({key}={value})", abs(value), RENDER_MAX_CHARS, "characters")
    text = a.get("s", a.get("value"))
    if name == "indent" and isinstance(text, str):
        width = a.get("width", 4)
        width = len(width) if isinstance(width, str) else width if _is_int(width) else 0
        _check_predicted("filter indent", len(text) + (text.count("\n") + 1) * max(width, 0))
    elif name == "wordwrap" and isinstance(text, str):
        wrap = a.get("wrapstring")
        _check_predicted("filter wordwrap", len(text) * (1 + (len(wrap) if isinstance(wrap, str) else 1)))
    elif name == "replace":
        _check_replace(text, a.get("old"), a.get("new"), a.get("count"))
    elif name == "join":
        items, sep = a.get("value"), a.get("d", "")
        if isinstance(items, (list, tuple)) and isinstance(sep, str):
            _check_predicted("filter join", len(sep) * max(len(items) - 1, 0) + sum(_text_len(x) for x in items))
    elif name == "format" and isinstance(text, str):
        rest = a.get("args", ())
        kwargs = a.get("kwargs", {})
        _check_percent_format(text, kwargs if kwargs else tuple(rest) if len(rest) != 1 else rest[0])
    elif name == "sum" and isinstance(a.get("start"), (list, tuple)):
        items = a.get("iterable")
        if isinstance(items, (list, tuple)):
            _check_predicted("filter sum", len(a["start"]) + sum(len(x) for x in items if isinstance(x, (list, tuple))),
                             items=True)
    elif name == "tojson" and _is_int(a.get("indent")) and a["indent"] > 64:
        raise _too_big("filter tojson(indent)", a["indent"], 64, "spaces")


def _budget_concat(parts) -> str:
    """``a ~ b ~ ...`` (Jinja's str_join) with its length checked before it is made."""
    texts = [p if isinstance(p, str) else str(p) for p in parts]
    _check_predicted("~", sum(len(t) for t in texts))
    return "".join(texts)


_env = None


def _environment():
    global _env
    if _env is not None:
        return _env
    import jinja2
    import jinja2.ext
    import jinja2.utils
    from jinja2.compiler import CodeGenerator, optimizeconst
    from jinja2.runtime import markup_join
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedFormatter
    from markupsafe import Markup

    class BudgetCodeGenerator(CodeGenerator):
        """Jinja's code generator with ``~`` going through ``environment.budget_concat``."""

        @optimizeconst
        def visit_Concat(self, node, frame) -> None:
            if frame.eval_ctx.volatile:
                func_name = "(environment.budget_markup_concat if context.eval_ctx.volatile else " \
                            "environment.budget_concat)"
            elif frame.eval_ctx.autoescape:
                func_name = "environment.budget_markup_concat"
            else:
                func_name = "environment.budget_concat"
            self.write(f"{func_name}((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class BudgetFormatter(SandboxedFormatter):
        """str.format in the sandbox, each field's spec and the running length checked."""

        def vformat(self, format_string, args, kwargs):
            self._made = len(format_string)
            return super().vformat(format_string, args, kwargs)

        def format_field(self, value, format_spec):
            for digits in re.findall(r"\d+", format_spec):
                if int(digits) > RENDER_MAX_CHARS:
                    raise _too_big("a format width", int(digits), RENDER_MAX_CHARS, "characters")
            text = super().format_field(value, format_spec)
            self._made += len(text)
            _check_predicted("str.format", self._made)
            return text

    class BudgetEnvironment(ImmutableSandboxedEnvironment):
        """transformers' sandbox, with the budget of the module docstring."""

        code_generator_class = BudgetCodeGenerator
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def call_binop(self, context, operator, left, right):
            _check_binop(operator, left, right)
            return _check_size(super().call_binop(context, operator, left, right), f"operator {operator}")

        def call(self, context, obj, /, *args, **kwargs):
            if isinstance(obj, (types.BuiltinFunctionType, types.BuiltinMethodType, types.MethodWrapperType)):
                _check_builtin_call(obj, args, kwargs)
            for value in (*args, *kwargs.values()):
                _check_size(value, "a call's argument")
            return _check_size(super().call(context, obj, *args, **kwargs), "a call's result")

        def wrap_str_format(self, value):
            if not isinstance(value, (types.MethodType, types.BuiltinMethodType)) \
                    or value.__name__ not in ("format", "format_map") or not isinstance(value.__self__, str) \
                    or isinstance(value.__self__, Markup):
                return super().wrap_str_format(value)
            fmt, is_map = value.__self__, value.__name__ == "format_map"
            formatter = BudgetFormatter(self)

            def wrapper(*args, **kwargs):
                if is_map:
                    if kwargs or len(args) != 1:
                        raise TypeError("format_map() takes exactly one positional argument")
                    args, kwargs = (), args[0]
                return str(formatter.vformat(fmt, args, kwargs))

            return wrapper

        @staticmethod
        def budget_concat(parts):
            return _budget_concat(parts)

        @staticmethod
        def budget_markup_concat(parts):
            _budget_concat(parts)
            return markup_join(parts)

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
            for name, value in attrs.items():
                TemplateNamespace._check_name(name)
                _check_size(value, "a namespace value")
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            _check_size(value, "a namespace value")
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

    env = BudgetEnvironment(trim_blocks=True, lstrip_blocks=True,
                            extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    for name, func in list(env.filters.items()):
        env.filters[name] = _budget_filter(name, func)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    _env = env
    return env
