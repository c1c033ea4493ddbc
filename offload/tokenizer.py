"""Text <-> token ids for a checkpoint's tokenizer: sentencepiece (Mixtral) or tokenizer.json.

What it is: a ``Tokenizer`` that loads ``tokenizer.model`` (and the bos/eos ids the checkpoint's
JSON files name), encodes and decodes text exactly as sentencepiece does, renders the
Mixtral-8x7B-Instruct chat format to ids (``encode_chat``), and a ``StreamDecoder`` that turns
generated ids into text as soon as that text is final (no half characters, right spaces). A
checkpoint with only a ``tokenizer.json`` (byte-level BPE: Qwen, OLMoE) gets a ``JsonTokenizer``
(the ``tokenizers`` library; ``bos_id`` None when the checkpoint has no bos token) with the same
interface. ``source`` names the file a tokenizer was read from, ``special_ids`` the ids that are
no ordinary text.

What it is not: it knows nothing about models, sampling or generation, and does not use
transformers. A checkpoint's own Jinja chat template is rendered by offload.chat_template
(``encode_messages`` picks it when there is one, else Mixtral's format).

What it reads, and what it guarantees: tokenizer.model (at most ``MODEL_MAX_BYTES``), else
tokenizer.json (at most ``TOKENIZER_JSON_MAX_BYTES``; neither is a TokenizerError naming both),
tokenizer_config.json, special_tokens_map.json, generation_config.json and config.json (each at
most ``JSON_MAX_BYTES``). Each must be a regular file (a folder, FIFO or device is refused, never
read); anything malformed (not UTF-8, not JSON, nested too deep, a number too long, a field of
the wrong type or an id outside the vocabulary) is a TokenizerError naming the file and the
field. Text to encode must be valid Unicode (no lone surrogates, which sentencepiece cannot take).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from offload.errors import TokenizerError

__all__ = ["ByteStreamDecoder", "JsonTokenizer", "Message", "StreamDecoder", "Tokenizer", "check_text"]

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")

# How this project trains sentencepiece models (the demo model's, the tests'): BPE with Mixtral's
# special ids, and the settings under which any text round-trips exactly (code, indentation,
# newlines, any Unicode through byte pieces).
TRAINER_OPTIONS = dict(
    model_type="bpe",
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    user_defined_symbols=["\n"],
    allow_whitespace_only_pieces=True,
    split_digits=True,
    byte_fallback=True,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    num_threads=1,
    minloglevel=2,
)

# Prompt ids a StreamDecoder keeps as context, so that the first generated piece gets the
# leading space it has after the prompt ("▁Paris" -> " Paris"). A few are enough: decoding is
# piece concatenation, only the first piece of a decode loses its "▁".
_CONTEXT_IDS = 6

# Size limits of the files read here, far above real ones (Mixtral's tokenizer.model is 482 KiB,
# a 256k-piece one ~4 MiB; tokenizer_config.json of models with many added tokens ~1 MiB).
MODEL_MAX_BYTES = 64 * 2**20
JSON_MAX_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Message:
    """One chat turn. ``role`` is "system", "user" or "assistant"."""

    role: str
    content: str


class Tokenizer:
    """A sentencepiece model plus the bos/eos ids of the checkpoint it came with."""

    def __init__(self, processor: spm.SentencePieceProcessor, bos_id: int,
                 eos_ids: Sequence[int], source: str = "tokenizer.model"):
        self._sp = processor
        self._source = source
        self._vocab_size = processor.get_piece_size()
        for name, tid in [("bos", bos_id), *(("eos", e) for e in eos_ids)]:
            if not 0 <= tid < self._vocab_size:
                raise TokenizerError(f"{source}: {name} id {tid} is outside the vocabulary "
                                     f"[0, {self._vocab_size})")
        if not eos_ids:
            raise TokenizerError(f"{source}: no eos id")
        self._bos_id = int(bos_id)
        self._eos = tuple(dict.fromkeys(int(e) for e in eos_ids))  # ordered, no repeats
        self._eos_set = frozenset(self._eos)
        # Per-id facts the stream decoder needs: which ids are invisible control tokens,
        # and the byte value of each byte-fallback piece ("<0xE6>" -> 0xE6).
        self._control = frozenset(i for i in range(self._vocab_size) if processor.is_control(i))
        self._byte_value: dict[int, int] = {}
        for i in range(self._vocab_size):
            if processor.is_byte(i):
                m = _BYTE_PIECE.fullmatch(processor.id_to_piece(i))
                if m:
                    self._byte_value[i] = int(m.group(1), 16)

    # ---- loading -------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | Path, bos_id: int | None = None,
                  eos_ids: int | Iterable[int] | None = None) -> Tokenizer:
        """Load a sentencepiece ``.model`` file; bos/eos default to the model's own."""
        path = Path(path)
        processor = _load_processor(path)
        if bos_id is None:
            bos_id = processor.bos_id()
            if bos_id < 0:
                raise TokenizerError(f"{path}: the model defines no bos token; pass bos_id")
        if eos_ids is None:
            eos = processor.eos_id()
            if eos < 0:
                raise TokenizerError(f"{path}: the model defines no eos token; pass eos_ids")
            eos_list = [eos]
        elif isinstance(eos_ids, int):
            eos_list = [eos_ids]
        else:
            eos_list = list(eos_ids)
        for tid in [bos_id, *eos_list]:
            if not (isinstance(tid, int) and not isinstance(tid, bool)):
                raise TokenizerError(f"{path}: token ids must be integers, got {tid!r}")
        return cls(processor, int(bos_id), eos_list, source=str(path))

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        """Load ``<model_dir>/tokenizer.model`` with bos/eos ids from the checkpoint's files.

        A checkpoint without tokenizer.model but with a ``tokenizer.json`` (Qwen, OLMoE) gets a
        ``JsonTokenizer`` instead; one that has both (Mixtral) is read with sentencepiece.

        Each of bos and eos comes from the first of these that names it: tokenizer_config.json
        (``bos_token``/``eos_token``, a string or ``{"content": ...}``, looked up in
        ``added_tokens_decoder`` then in the sentencepiece vocabulary), special_tokens_map.json
        (the same keys, for those tokenizer_config.json does not name, as transformers reads it),
        generation_config.json, config.json (``bos_token_id``/``eos_token_id``, an int or a
        list), and last the sentencepiece model itself. ``eos_id`` is the first eos id of the
        first file that names one; ``eos_ids`` holds every eos id any of the JSON files names.
        """
        model_dir = Path(model_dir)
        model_path = model_dir / "tokenizer.model"
        json_path = model_dir / "tokenizer.json"
        if not (model_path.exists() or model_path.is_symlink()):
            if json_path.exists() or json_path.is_symlink():
                return JsonTokenizer.from_dir(model_dir)  # Qwen, OLMoE: byte-level BPE only
            raise TokenizerError(f"{model_path}: no such file, nor {json_path.name}; the checkpoint's "
                                 "tokenizer is one of them")
        processor = _load_processor(model_path)

        bos: tuple[int, str] | None = None  # (id, file that named it)
        eos: list[tuple[int, str]] = []
        added, named = named_special_tokens(model_dir)
        for key, content, where in named:
            tid = added.get(content)
            if tid is None:
                tid = processor.piece_to_id(content)
                if tid == processor.unk_id() and content != processor.id_to_piece(tid):
                    raise TokenizerError(f"{where}: {key} {content[:60]!r} is not in "
                                         f"{model_path.name} nor in added_tokens_decoder")
            if key == "bos_token":
                bos = (tid, str(where))
            else:
                eos.append((tid, str(where)))
        for name in ("generation_config.json", "config.json"):
            cfg_path = model_dir / name
            cfg = read_json_object(cfg_path)
            if cfg is None:
                continue
            if bos is None and cfg.get("bos_token_id") is not None:
                ids = _id_list(cfg["bos_token_id"], "bos_token_id", cfg_path)
                if ids:
                    bos = (ids[0], str(cfg_path))
            if cfg.get("eos_token_id") is not None:
                eos += [(e, str(cfg_path)) for e in _id_list(cfg["eos_token_id"],
                                                             "eos_token_id", cfg_path)]
        if bos is None:
            if processor.bos_id() < 0:
                raise TokenizerError(f"{model_path}: no bos token in the model or its config files")
            bos = (processor.bos_id(), str(model_path))
        if not eos:
            if processor.eos_id() < 0:
                raise TokenizerError(f"{model_path}: no eos token in the model or its config files")
            eos = [(processor.eos_id(), str(model_path))]
        vocab = processor.get_piece_size()
        for tid, where in [bos, *eos]:
            if not 0 <= tid < vocab:
                raise TokenizerError(f"{where}: token id {tid} is outside the vocabulary "
                                     f"[0, {vocab}) of {model_path}")
        tokenizer = cls(processor, bos[0], [e for e, _ in eos], source=str(model_path))
        tokenizer.model_dir = model_dir
        return tokenizer

    # ---- vocabulary ----------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def source(self) -> str:
        """The file this tokenizer was read from (a tokenizer.model's path, or a tokenizer.json's)."""
        return self._source

    @property
    def special_ids(self) -> frozenset[int]:
        """The ids that are no ordinary text: bos, every eos, and the control pieces (special
        added tokens, for a tokenizer.json)."""
        return self._control | self._eos_set | ({self._bos_id} if self._bos_id is not None else set())

    @property
    def eos_id(self) -> int:
        """The first eos id (the one a chat turn ends with)."""
        return self._eos[0]

    @property
    def eos_ids(self) -> frozenset[int]:
        """Every id that ends generation."""
        return self._eos_set

    def id_to_piece(self, token_id: int) -> str:
        if not self._check_ids((token_id,)):
            return ""  # a padding id
        return self._sp.id_to_piece(int(token_id))

    # ---- text ----------------------------------------------------------------------------

    def encode(self, text: str, *, bos: bool = False) -> list[int]:
        """Ids of ``text`` as sentencepiece encodes it (a "▁" is prefixed to the first word).
        Text with a lone surrogate (undecodable bytes kept by Python) is a TokenizerError."""
        check_text(text, "encode")
        ids = self._sp.encode(text)
        return [self._bos_id, *ids] if bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; control ids (bos/eos) decode to ""."""
        ids = self._check_ids(ids)
        return self._sp.decode(ids) if ids else ""

    # The model's embedding rows, when it has more than the tokenizer has tokens (Qwen pads
    # 151669 tokens to 151936 rows): ids between the two are valid output that decodes to "",
    # as transformers' decode skips them. Set by ``pad_to``.
    _padded_size: int | None = None

    def pad_to(self, model_vocab_size: int) -> None:
        """Accept ids up to ``model_vocab_size`` (the model's embedding rows) as padding ids
        that decode to nothing; a model may sample one, and its text must not fail."""
        self._padded_size = max(model_vocab_size, self._vocab_size)

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        """``ids`` as ints, padding ids (see ``pad_to``) left out; an id outside the vocabulary
        and its padding is a TokenizerError."""
        out = [int(i) for i in ids]
        limit = self._padded_size or self._vocab_size
        for i in out:
            if not 0 <= i < limit:
                raise TokenizerError(f"{self._source}: token id {i} is outside the vocabulary "
                                     f"[0, {limit})")
        return out if limit == self._vocab_size else [i for i in out if i < self._vocab_size]

    # ---- chat ----------------------------------------------------------------------------

    model_dir: Path | None = None  # where from_dir read it: the chat template lives there too

    @functools.cached_property
    def chat_template(self):
        """The checkpoint's own chat template (``offload.chat_template``), or None."""
        if self.model_dir is None:
            return None
        from offload.chat_template import load_chat_template

        return load_chat_template(self.model_dir)

    def encode_messages(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> list[int]:
        """A conversation's ids in the checkpoint's chat format: its ``chat_template`` rendered
        as transformers renders it when it has one, else the Mixtral instruct format."""
        if self.chat_template is not None:
            return self.chat_template.encode(self, messages, add_generation_prompt=add_generation_prompt)
        return self.encode_chat(messages, add_generation_prompt=add_generation_prompt)

    def encode_chat(self, messages: Sequence[Message], *,
                    add_generation_prompt: bool = True) -> list[int]:
        """Ids of a conversation in the Mixtral-8x7B-Instruct format.

        ``<s>[INST] user [/INST] assistant</s>[INST] user2 [/INST]``: one bos id, each user turn
        as sentencepiece's encoding of ``"[INST] " + content + " [/INST]"``, each assistant turn
        as the encoding of its content followed by the eos id. Mixtral has no system role: a
        leading system message is put before the first user message, ``system + "\\n\\n" + user``.
        Text in messages is never read as control tokens ("</s>" in content stays text).
        """
        turns = list(messages)
        for m in turns:
            if not isinstance(m, Message) or not isinstance(m.content, str):
                raise TokenizerError(f"encode_chat: expected Message(role, content: str), got {m!r}")
            if m.role not in ("system", "user", "assistant"):
                raise TokenizerError(f"encode_chat: unknown role {m.role!r} "
                                     "(expected system, user or assistant)")
        system = None
        if turns and turns[0].role == "system":
            system = turns.pop(0).content
        for i, m in enumerate(turns):
            expected = "user" if i % 2 == 0 else "assistant"
            if m.role != expected:
                where = "after the system message" if m.role == "system" else f"at turn {i}"
                raise TokenizerError(f"encode_chat: roles must alternate user/assistant "
                                     f"(after an optional leading system message); got "
                                     f"{m.role!r} {where}")
        if not turns:
            raise TokenizerError("encode_chat: the conversation has no user message")
        if add_generation_prompt and turns[-1].role != "user":
            raise TokenizerError("encode_chat: with add_generation_prompt the conversation must "
                                 "end with a user message")
        for m in turns:
            check_text(m.content, f"encode_chat: a {m.role} message")
        ids = [self._bos_id]
        for i, m in enumerate(turns):
            if m.role == "user":
                content = m.content
                if i == 0 and system is not None:
                    content = system + "\n\n" + content
                ids += self._sp.encode("[INST] " + content + " [/INST]")
            else:
                ids += self._sp.encode(m.content)
                ids.append(self.eos_id)
        return ids

    # ---- streaming -----------------------------------------------------------------------

    def stream_decoder(self, prompt_ids: Sequence[int] = ()) -> StreamDecoder:
        """A decoder for ids generated after ``prompt_ids`` (give ``()`` for none)."""
        return StreamDecoder(self, prompt_ids)



def named_special_tokens(model_dir: Path) -> tuple[dict[str, int], list[tuple[str, str, Path]]]:
    """What a checkpoint's JSON files say of its bos and eos tokens, as transformers reads them:
    (``added_tokens_decoder`` of tokenizer_config.json as content -> id, and
    [(key, content, file that named it)] for "bos_token" then "eos_token", each from
    tokenizer_config.json, else special_tokens_map.json, left out when neither names it). The
    callers turn a content into an id with their own vocabulary."""
    tok_cfg_path = model_dir / "tokenizer_config.json"
    tok_cfg = read_json_object(tok_cfg_path)
    added = added_tokens(tok_cfg, tok_cfg_path) if tok_cfg is not None else {}
    map_path = model_dir / "special_tokens_map.json"
    token_map = read_json_object(map_path)
    named = []
    for key in ("bos_token", "eos_token"):
        content, where = None, tok_cfg_path
        if tok_cfg is not None:
            content = _token_content(tok_cfg.get(key), key, tok_cfg_path)
        if content is None and token_map is not None:
            content, where = _token_content(token_map.get(key), key, map_path), map_path
        if content is not None:
            named.append((key, content, where))
    return added, named


class _EmittedText:
    """What a stream decoder has given out: ``_chunks``, joined on demand as ``text``."""

    _chunks: list[str]

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""


class StreamDecoder(_EmittedText):
    """Turns ids, one at a time, into text as soon as that text is final.

    The concatenation of every ``push`` plus ``flush`` equals ``decode(generated)`` with no
    prompt, and ``decode(prompt + generated)[len(decode(prompt)):]`` with one (when the prompt
    ends on a whole character, as every ``encode`` result does). Text is held back while it ends
    in an unfinished UTF-8 sequence of byte-fallback pieces, so no chunk holds a half character.

    It decodes a small window of ids (vLLM's prefix/read offsets): the text of
    ``ids[prefix:]`` minus the text of ``ids[prefix:read]``. The window starts at the ids of the
    previous chunk, which carry the context for the next piece's leading space, so the cost per
    token stays bounded however long the generation.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = ()):
        self._tok = tokenizer
        prompt = tokenizer._check_ids(prompt_ids)
        start = max(len(prompt) - _CONTEXT_IDS, 0)
        # sentencepiece drops the "▁" of the first non-control piece of a decode; a window
        # of control ids alone would let it drop the next piece's space, so reach back to a
        # piece that takes that role.
        while start > 0 and all(i in tokenizer._control for i in prompt[start:]):
            start -= 1
        self._ids = prompt[start:]   # the window: ids[prefix:], prefix is always 0
        self._read = len(self._ids)  # ids[:read] is text already given out (or the prompt's)
        self._read_text = self._decode(self._ids)
        self._chunks: list[str] = []

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text that became final with it ("" if none)."""
        ids = self._tok._check_ids((token_id,))
        if not ids:  # a padding id: no text
            return ""
        self._ids.append(ids[0])
        if self._unfinished_char():
            return ""
        return self._emit()

    def flush(self) -> str:
        """Return whatever is left (an unfinished character comes out as U+FFFD)."""
        return self._emit()

    def _emit(self) -> str:
        text = self._decode(self._ids)
        if len(text) <= len(self._read_text):
            return ""  # nothing visible yet (control ids, or a lone leading "▁")
        new = text[len(self._read_text):]
        # The ids given out this time become the next window's context.
        self._ids = self._ids[self._read:]
        self._read = len(self._ids)
        self._read_text = self._decode(self._ids)
        self._chunks.append(new)
        return new

    def _decode(self, ids: list[int]) -> str:
        return self._tok._sp.decode(ids) if ids else ""

    def _unfinished_char(self) -> bool:
        """Do the window's trailing byte pieces end inside a UTF-8 sequence that may still finish?"""
        byte_value = self._tok._byte_value
        tail: list[int] = []
        for tid in reversed(self._ids):
            value = byte_value.get(tid)
            if value is None or len(tail) == 4:
                break
            tail.append(value)
        # tail is newest first; walk back over continuation bytes to the sequence's lead byte.
        for n, b in enumerate(tail):
            if 0x80 <= b <= 0xBF:
                continue
            need = 2 if 0xC0 <= b <= 0xDF else 3 if 0xE0 <= b <= 0xEF else \
                4 if 0xF0 <= b <= 0xF7 else 1
            return n + 1 < need
        return False  # only continuation bytes (or none): nothing left to complete


def check_text(text: str, where: str) -> None:
    """TokenizerError unless ``text`` is a str sentencepiece can take: no lone surrogates (what
    Python makes of undecodable bytes in arguments and streams with ``surrogateescape``)."""
    if not isinstance(text, str):
        raise TokenizerError(f"{where}: expected text (str), got {type(text).__name__}")
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TokenizerError(f"{where}: the text is not valid Unicode: a lone surrogate "
                             f"{text[e.start]!r} at character {e.start}") from None


def read_file_bytes(path: Path, limit: int, what: str) -> bytes:
    """The bytes of ``path``, a regular file of at most ``limit`` bytes; FileNotFoundError when
    it does not exist, a TokenizerError naming it for anything else that is wrong."""
    try:
        if not path.is_file():
            if not path.exists() and not path.is_symlink():
                raise FileNotFoundError(path)
            raise TokenizerError(f"{path}: not a regular file (expected the {what})")
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except (FileNotFoundError, TokenizerError):
        raise
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read ({e.strerror or e})") from None
    except ValueError as e:  # an embedded NUL in the path
        raise TokenizerError(f"{path}: cannot read ({e})") from None
    if len(data) > limit:
        raise TokenizerError(f"{path}: larger than {limit} bytes; not a {what}")
    return data


def read_text_file(path: Path, limit: int, what: str) -> str:
    """``read_file_bytes`` decoded as UTF-8; a missing file is a TokenizerError too."""
    try:
        data = read_file_bytes(path, limit, what)
    except FileNotFoundError:
        raise TokenizerError(f"{path}: no such file") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path}: not UTF-8 text (byte {e.start})") from None


def _load_processor(path: Path) -> spm.SentencePieceProcessor:
    try:
        data = read_file_bytes(path, MODEL_MAX_BYTES, "sentencepiece model")
    except FileNotFoundError:
        raise TokenizerError(f"{path}: no such file") from None
    try:
        processor = spm.SentencePieceProcessor(model_proto=data)
    except (RuntimeError, ValueError, TypeError, OSError):
        raise TokenizerError(f"{path}: not a sentencepiece model") from None
    if processor.get_piece_size() == 0:
        raise TokenizerError(f"{path}: not a sentencepiece model (empty vocabulary)")
    return processor


def read_json_object(path: Path, limit: int = JSON_MAX_BYTES) -> dict | None:
    """The JSON object in ``path``, or None when the file does not exist. Anything else wrong
    (not a regular file, over ``JSON_MAX_BYTES``, not UTF-8, not JSON, nested too deep for the
    parser, a number too long, not an object) is a TokenizerError naming the file."""
    try:
        data = read_file_bytes(path, limit, "JSON file")
    except FileNotFoundError:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path}: not UTF-8 text (byte {e.start})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise TokenizerError(f"{path}: invalid JSON (nested too deeply)") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise TokenizerError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {_json_type(obj)}")
    return obj


def _json_type(value) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
             int: "a number", float: "a number"}
    return names.get(type(value), type(value).__name__)


def _token_content(value, key: str, path: Path) -> str | None:
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str):
        raise TokenizerError(f"{path}: {key} must be a string or {{\"content\": \"...\"}}, "
                             f"got {_json_type(value)}")
    check_text(value, f"{path}: {key}")
    return value


def added_tokens(cfg: dict, path: Path) -> dict[str, int]:
    """content -> id from tokenizer_config.json's ``added_tokens_decoder`` (an object whose keys
    are ids, each value ``{"content": str, ...}``); a malformed entry is a TokenizerError."""
    table = cfg.get("added_tokens_decoder")
    if table is None:
        return {}
    if not isinstance(table, dict):
        raise TokenizerError(f"{path}: added_tokens_decoder must be an object of id -> "
                             f"{{\"content\": ...}}, got {_json_type(table)}")
    out: dict[str, int] = {}
    for key, entry in table.items():
        content = entry.get("content") if isinstance(entry, dict) else None
        if not (key.isascii() and key.isdigit() and len(key) <= 18) or not isinstance(content, str):
            raise TokenizerError(f"{path}: added_tokens_decoder[{key[:40]!r}]: expected a token id "
                                 "(digits) mapping to {\"content\": a string}")
        check_text(content, f"{path}: added_tokens_decoder[{key!r}]")
        if content:
            out.setdefault(content, int(key))
    return out


def _id_list(value, key: str, path: Path) -> list[int]:
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TokenizerError(f"{path}: {key} must be an int or a list of ints")
    return list(values)


# ---- tokenizer.json (Hugging Face ``tokenizers``): byte-level BPE as Qwen and OLMoE ship ----------

# tokenizer.json files are larger than the other JSON files (Qwen's is ~11 MiB, the largest known
# ~35 MiB).
TOKENIZER_JSON_MAX_BYTES = 128 * 2**20


@functools.cache
def _byte_level_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet, char -> byte (the inverse of ``bytes_to_unicode``)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class JsonTokenizer(Tokenizer):
    """A checkpoint's ``tokenizer.json`` (byte-level BPE) read with the ``tokenizers`` library.

    The same interface as the sentencepiece ``Tokenizer``: ``encode`` gives the ids transformers'
    ``tokenizer(text, add_special_tokens=False)`` gives (special-token strings in the text become
    their ids, as transformers does by default), with the bos id first for ``bos=True`` when the
    checkpoint has a bos token (Qwen has none: then nothing is added, and ``bos_id`` is None).
    ``decode`` skips special tokens; ``encode_messages`` renders the checkpoint's chat template
    and encodes the text as ``apply_chat_template(tokenize=True)`` does; ``stream_decoder``
    gives a ``ByteStreamDecoder`` (text only once its UTF-8 bytes are complete).
    """

    def __init__(self, hf, bos_id: int | None, eos_ids: Sequence[int], source: str = "tokenizer.json"):
        self._hf = hf
        self._source = source
        vocab = hf.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values(), default=-1) + 1
        if self._vocab_size == 0:
            raise TokenizerError(f"{source}: empty vocabulary")
        if not eos_ids:
            raise TokenizerError(f"{source}: no eos token in tokenizer_config.json, "
                                 "generation_config.json or config.json")
        for name, tid in [*([("bos", bos_id)] if bos_id is not None else []), *(("eos", e) for e in eos_ids)]:
            if not 0 <= tid < self._vocab_size:
                raise TokenizerError(f"{source}: {name} id {tid} is outside the vocabulary "
                                     f"[0, {self._vocab_size})")
        self._bos_id = None if bos_id is None else int(bos_id)
        self._eos = tuple(dict.fromkeys(int(e) for e in eos_ids))
        self._eos_set = frozenset(self._eos)
        special = {i for i, t in hf.get_added_tokens_decoder().items() if t.special}
        self._control = frozenset(special)
        # The bytes each id stands for, as the ByteLevel decoder makes them: each char of the
        # token through the byte-level alphabet, or the token's own UTF-8 when a char is not in
        # it (added tokens); special tokens are skipped (b""), as ``decode`` skips them.
        chars = _byte_level_chars()
        table = [b""] * self._vocab_size
        for token, i in vocab.items():
            if i in special:
                continue
            try:
                table[i] = bytes(chars[c] for c in token)
            except KeyError:
                table[i] = token.encode("utf-8", "surrogatepass")
        self._bytes = table

    @classmethod
    def from_file(cls, path, bos_id=None, eos_ids=None):  # sentencepiece models only
        raise TokenizerError(f"{path}: from_file reads sentencepiece models; use from_dir")

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> JsonTokenizer:
        """Load ``<model_dir>/tokenizer.json``; bos/eos as ``Tokenizer.from_dir`` finds them,
        except that bos comes only from tokenizer_config.json / special_tokens_map.json (as the
        tokenizer transformers builds has it: Qwen's configs name a bos_token_id its tokenizer
        never adds)."""
        from tokenizers import Tokenizer as HFTokenizer

        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        spec = read_json_object(path, TOKENIZER_JSON_MAX_BYTES)
        if spec is None:
            raise TokenizerError(f"{path}: no such file")
        decoder = spec.get("decoder")
        kind = decoder.get("type") if isinstance(decoder, dict) else decoder
        if kind != "ByteLevel":
            raise TokenizerError(f"{path}: decoder {_json_type(kind) if not isinstance(kind, str) else kind!r} "
                                 "is not supported (only byte-level BPE tokenizer.json; a sentencepiece "
                                 "checkpoint needs its tokenizer.model)")
        try:
            hf = HFTokenizer.from_str(read_text_file(path, TOKENIZER_JSON_MAX_BYTES, "tokenizer.json"))
        except TokenizerError:
            raise
        except Exception as e:  # noqa: BLE001 - the library raises a bare Exception for a bad file
            raise TokenizerError(f"{path}: not a valid tokenizer.json ({_one_line(e)})") from None

        def token_id(content: str, key: str, where: Path) -> int:
            tid = hf.token_to_id(content)
            if tid is None:
                tid = added.get(content)
            if tid is None:
                raise TokenizerError(f"{where}: {key} {content[:60]!r} is not in {path.name} "
                                     "nor in added_tokens_decoder")
            return tid

        added, named = named_special_tokens(model_dir)
        bos: int | None = None
        eos: list[int] = []
        for key, content, where in named:
            if key == "bos_token":
                bos = token_id(content, key, where)
            else:
                eos.append(token_id(content, key, where))
        for name in ("generation_config.json", "config.json"):
            cfg_path = model_dir / name
            cfg = read_json_object(cfg_path)
            if cfg is not None and cfg.get("eos_token_id") is not None:
                eos += _id_list(cfg["eos_token_id"], "eos_token_id", cfg_path)
        tokenizer = cls(hf, bos, eos, source=str(path))
        tokenizer.model_dir = model_dir
        return tokenizer

    @property
    def bos_id(self) -> int | None:  # type: ignore[override]
        """The bos id, or None when the checkpoint has no bos token (Qwen)."""
        return self._bos_id

    def id_to_piece(self, token_id: int) -> str:
        if not self._check_ids((token_id,)):
            return ""  # a padding id
        return self._hf.id_to_token(int(token_id)) or ""

    def encode(self, text: str, *, bos: bool = False) -> list[int]:
        """Ids of ``text`` as transformers' ``tokenizer(text, add_special_tokens=False)`` gives
        them, after the bos id when ``bos`` and the checkpoint has one."""
        check_text(text, "encode")
        ids = self._hf.encode(text, add_special_tokens=False).ids
        return [self._bos_id, *ids] if bos and self._bos_id is not None else ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; special tokens (eos, <|im_start|>...) decode to ""."""
        ids = self._check_ids(ids)
        return self._hf.decode(ids, skip_special_tokens=True) if ids else ""

    def encode_messages(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> list[int]:
        """The checkpoint's chat template rendered, then encoded as ``apply_chat_template``
        (``tokenize=True``) does: special-token strings become their ids, no bos added."""
        template = self.chat_template
        if template is None:
            raise TokenizerError(f"{self.model_dir}: the checkpoint has no chat template "
                                 "(tokenizer_config.json chat_template or chat_template.jinja)")
        text = template.render(messages, add_generation_prompt=add_generation_prompt)
        check_text(text, template.source)
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_chat(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> list[int]:
        """Mixtral's format means nothing to these checkpoints: the chat template is used."""
        return self.encode_messages(messages, add_generation_prompt=add_generation_prompt)

    def stream_decoder(self, prompt_ids: Sequence[int] = ()) -> ByteStreamDecoder:
        return ByteStreamDecoder(self, prompt_ids)


class ByteStreamDecoder(_EmittedText):
    """Streaming text of byte-level BPE ids: each id's bytes through an incremental UTF-8
    decoder, so a character split across ids comes out once its last byte arrives, and the
    chunks join to ``decode(ids)`` (invalid bytes become U+FFFD where the full decode has them).
    Byte-level pieces carry their own spaces, so the prompt gives no context; it is only checked."""

    def __init__(self, tokenizer: JsonTokenizer, prompt_ids: Sequence[int] = ()):
        import codecs

        self._tok = tokenizer
        tokenizer._check_ids(prompt_ids)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._chunks: list[str] = []

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text that became final with it ("" if none)."""
        ids = self._tok._check_ids((token_id,))
        if not ids:  # a padding id: no text
            return ""
        return self._keep(self._utf8.decode(self._tok._bytes[ids[0]]))

    def flush(self) -> str:
        """Return whatever is left (an unfinished character comes out as U+FFFD)."""
        return self._keep(self._utf8.decode(b"", final=True))

    def _keep(self, new: str) -> str:
        if new:
            self._chunks.append(new)
        return new
