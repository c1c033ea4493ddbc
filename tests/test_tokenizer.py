"""Tests of offload.tokenizer against sentencepiece itself and Mixtral's official chat template."""

from __future__ import annotations

import inspect
import json
import json.encoder
import time
from pathlib import Path

import pytest
import sentencepiece as spm
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from offload.errors import TokenizerError
from offload.tokenizer import Message, Tokenizer
from tests.tokenizer_builder import write_tokenizer

# Mixtral-8x7B-Instruct-v0.1's tokenizer_config.json chat_template, verbatim.
MIXTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant "
    "roles are supported!') }}{% endif %}{% endfor %}"
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    write_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def tok(model_dir) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)


@pytest.fixture(scope="module")
def sp(model_dir) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))


def _copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "tokenizer.model").write_bytes((src / "tokenizer.model").read_bytes())
    return dst


# ---- the builder -------------------------------------------------------------------------

def test_builder_is_fast_deterministic_and_mixtral_shaped(tmp_path, sp):
    t0 = time.perf_counter()
    path = write_tokenizer(tmp_path / "a")
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0
    assert path == tmp_path / "a" / "tokenizer.model"
    assert path.read_bytes() == write_tokenizer(tmp_path / "b").read_bytes()
    assert sp.vocab_size() == 512
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert sp.pad_id() == -1
    assert sum(sp.is_byte(i) for i in range(sp.vocab_size())) == 256
    cfg = json.loads((tmp_path / "a" / "tokenizer_config.json").read_text())
    assert (cfg["bos_token"], cfg["eos_token"], cfg["unk_token"]) == ("<s>", "</s>", "<unk>")
    assert cfg["add_bos_token"] is True and cfg["add_eos_token"] is False
    assert write_tokenizer(tmp_path / "c", vocab_size=400).exists()


# ---- encode / decode ---------------------------------------------------------------------

ROUND_TRIP = [
    "",
    "Hello, world!",
    inspect.getsource(json.encoder),  # code the model was not trained on
    "    indented\n\tTabbed\t\n\n\n   trailing   \n",
    " leading space",
    "  two leading spaces",
    "\n starts with a newline",
    "Le garçon a mangé une crème brûlée.",
    "日本語と中文 😀 🙂 👍🏽 e\u0301 \u00a0nbsp \u200bzwsp",
    "\r\n windows line\r\n",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


@settings(max_examples=150, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_round_trip_any_text(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_encode_matches_sentencepiece_and_bos(tok, sp):
    text = "def f(x):\n    return x  # é 😀"
    assert tok.encode(text) == sp.encode(text)
    assert tok.encode(text, bos=True) == [1, *sp.encode(text)]
    assert tok.encode("", bos=True) == [1]
    # Control ids decode to nothing.
    assert tok.decode([tok.bos_id, *sp.encode("hi"), tok.eos_id]) == "hi"
    assert tok.decode([]) == ""


def test_byte_fallback_is_used(tok, sp):
    ids = tok.encode("😀")  # not in the training text: four byte pieces
    assert [sp.id_to_piece(i) for i in ids[-4:]] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]


@pytest.mark.parametrize("bad", [512, 10**6, -1])
def test_decode_out_of_range_id(tok, bad):
    with pytest.raises(TokenizerError, match=str(bad)) as e:
        tok.decode([5, bad])
    assert "tokenizer.model" in str(e.value)
    with pytest.raises(TokenizerError):
        tok.stream_decoder().push(bad)


# ---- bos / eos from the checkpoint's files -----------------------------------------------

def test_ids_from_tokenizer_config(tok):
    assert tok.vocab_size == 512
    assert (tok.bos_id, tok.eos_id, tok.eos_ids) == (1, 2, frozenset({2}))


def test_tokenizer_config_wins_and_accepts_dicts(tmp_path, model_dir, sp):
    d = _copy_model(model_dir, tmp_path)
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "▁self", "lstrip": False},  # any piece: proves the lookup
        "eos_token": "▁the",
    }))
    (d / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    tok = Tokenizer.from_dir(d)
    assert tok.bos_id == sp.piece_to_id("▁self")
    assert tok.eos_id == sp.piece_to_id("▁the")  # the first eos: tokenizer_config's
    assert tok.eos_ids == {sp.piece_to_id("▁the"), 2}


def test_added_tokens_decoder(tmp_path, model_dir):
    d = _copy_model(model_dir, tmp_path)
    (d / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": {"1": {"content": "<s>", "special": True},
                                 "7": {"content": "<|im_end|>", "special": True}},
        "bos_token": "<s>", "eos_token": "<|im_end|>",
    }))
    tok = Tokenizer.from_dir(d)
    assert (tok.bos_id, tok.eos_id) == (1, 7)


def test_ids_from_generation_config_and_config(tmp_path, model_dir):
    d = _copy_model(model_dir, tmp_path)
    (d / "tokenizer_config.json").write_text(json.dumps({"unk_token": "<unk>"}))
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 5,
                                                          "eos_token_id": [9, 2]}))
    (d / "config.json").write_text(json.dumps({"bos_token_id": 6, "eos_token_id": 2}))
    tok = Tokenizer.from_dir(d)
    assert tok.bos_id == 5  # generation_config.json before config.json
    assert tok.eos_id == 9
    assert tok.eos_ids == {9, 2}

    (d / "generation_config.json").unlink()
    tok = Tokenizer.from_dir(d)
    assert (tok.bos_id, tok.eos_id, tok.eos_ids) == (6, 2, {2})


def test_ids_from_sentencepiece_when_no_json(tmp_path, model_dir):
    tok = Tokenizer.from_dir(_copy_model(model_dir, tmp_path))
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    tok = Tokenizer.from_file(tmp_path / "tokenizer.model", bos_id=1, eos_ids=[2, 9])
    assert (tok.bos_id, tok.eos_id, tok.eos_ids) == (1, 2, {2, 9})


def test_missing_model_names_the_path(tmp_path):
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_dir(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere" / "tokenizer.model") in str(e.value)
    assert "\n" not in str(e.value)


def test_unreadable_files_name_the_file(tmp_path, model_dir):
    (tmp_path / "tokenizer.model").write_bytes(b"\x00not a model at all")
    with pytest.raises(TokenizerError, match="tokenizer.model"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"")
    with pytest.raises(TokenizerError, match="tokenizer.model"):
        Tokenizer.from_dir(tmp_path)

    d = _copy_model(model_dir, tmp_path / "json")
    (d / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        Tokenizer.from_dir(d)
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(TokenizerError, match="tokenizer_config.json.*<\\|nope\\|>"):
        Tokenizer.from_dir(d)
    (d / "tokenizer_config.json").unlink()
    (d / "config.json").write_text(json.dumps({"eos_token_id": 32000}))
    with pytest.raises(TokenizerError, match="config.json.*32000"):
        Tokenizer.from_dir(d)


# ---- chat format -------------------------------------------------------------------------

CONVERSATIONS = [
    [Message("user", "What is the capital of France?")],
    [Message("user", "hi"), Message("assistant", "Hello! How can I help?"),
     Message("user", "Écris un poème sur 日本 😀\nwith a newline")],
    [Message("user", "a"), Message("assistant", "b"), Message("user", "c"),
     Message("assistant", "d </s> [INST] not a control token"), Message("user", "e")],
]


def _by_hand(sp, messages, eos=2):
    """Expected ids, built straight from sentencepiece."""
    ids = [1]
    for m in messages:
        if m.role == "user":
            ids += sp.encode(f"[INST] {m.content} [/INST]")
        else:
            ids += sp.encode(m.content) + [eos]
    return ids


def _as_template_text(tok, ids):
    """Our ids back to text with the control ids written out, like the template's string.

    Each run between control ids is decoded on its own, so sentencepiece drops the "▁" it
    prefixed when that run was encoded ("</s>[INST]", not "</s> [INST]").
    """
    names = {tok.bos_id: "<s>", tok.eos_id: "</s>"}
    out, run = [], []
    for i in ids:
        if i in names:
            out += [tok.decode(run), names[i]]
            run = []
        else:
            run.append(i)
    return "".join(out) + tok.decode(run)


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_encode_chat_by_hand(tok, sp, messages):
    assert tok.encode_chat(messages) == _by_hand(sp, messages)


@pytest.mark.parametrize("messages", CONVERSATIONS + [CONVERSATIONS[1][:2]])
def test_encode_chat_matches_official_template(tok, messages):
    chat_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    (rendered,), _ = chat_utils.render_jinja_template(
        [[{"role": m.role, "content": m.content} for m in messages]],
        chat_template=MIXTRAL_TEMPLATE, bos_token="<s>", eos_token="</s>")
    ids = tok.encode_chat(messages, add_generation_prompt=messages[-1].role == "user")
    # Mistral's reference tokenizer (mistral-common) encodes each reply on its own, so the reply
    # starts with sentencepiece's "▁" ("[/INST] Hello", ids "▁Hello"); the template writes
    # "[/INST]Hello". That one space before each reply is the only allowed difference.
    expected = rendered
    for m in messages:
        if m.role == "assistant":
            expected = expected.replace(f"[/INST]{m.content}</s>", f"[/INST] {m.content}</s>", 1)
    assert _as_template_text(tok, ids) == expected
    assert ids.count(tok.eos_id) == sum(m.role == "assistant" for m in messages)
    assert ids.count(tok.bos_id) == 1


def test_encode_chat_system_message(tok, sp):
    system, user = "You are terse.", "Capital of France?"
    ids = tok.encode_chat([Message("system", system), Message("user", user)])
    assert ids == [1, *sp.encode(f"[INST] {system}\n\n{user} [/INST]")]
    assert tok.decode(ids) == f"[INST] {system}\n\n{user} [/INST]"
    # Only the first user turn gets it.
    ids2 = tok.encode_chat([Message("system", system), Message("user", user),
                            Message("assistant", "Paris."), Message("user", "And Spain?")])
    assert ids2 == _by_hand(sp, [Message("user", f"{system}\n\n{user}"),
                                 Message("assistant", "Paris."), Message("user", "And Spain?")])


@pytest.mark.parametrize("messages, add_prompt", [
    ([Message("assistant", "x")], True),
    ([Message("user", "x"), Message("user", "y")], True),
    ([Message("user", "x"), Message("assistant", "y"), Message("assistant", "z")], False),
    ([Message("user", "x"), Message("system", "s")], True),
    ([Message("system", "s"), Message("system", "t"), Message("user", "x")], True),
    ([Message("user", "x"), Message("tool", "y")], True),
    ([Message("system", "s")], True),
    ([], False),
    ([Message("user", "x"), Message("assistant", "y")], True),  # must end with a user turn
])
def test_encode_chat_rejects_bad_conversations(tok, messages, add_prompt):
    with pytest.raises(TokenizerError):
        tok.encode_chat(messages, add_generation_prompt=add_prompt)


def test_encode_chat_without_generation_prompt_ends_with_eos(tok, sp):
    msgs = [Message("user", "x"), Message("assistant", "y")]
    assert tok.encode_chat(msgs, add_generation_prompt=False) == _by_hand(sp, msgs)
    assert tok.encode_chat(msgs, add_generation_prompt=False)[-1] == tok.eos_id


# ---- streaming ---------------------------------------------------------------------------

def _stream(tok, generated, prompt=()):
    dec = tok.stream_decoder(prompt)
    chunks = [dec.push(i) for i in generated]
    chunks.append(dec.flush())
    assert dec.text == "".join(chunks)
    return chunks


def _expected(tok, generated, prompt):
    if not prompt:
        return tok.decode(generated)
    return tok.decode([*prompt, *generated])[len(tok.decode(prompt)):]


def _check_chunks(chunks, expected):
    assert "".join(chunks) == expected
    pos = 0
    for chunk in chunks:
        # Final as given out: each chunk is exactly the next stretch of the full text...
        assert chunk == expected[pos:pos + len(chunk)]
        # ...so it never holds a replacement character the full text lacks.
        for k, c in enumerate(chunk):
            if c == "\ufffd":
                assert expected[pos + k] == "\ufffd"
        pos += len(chunk)


@st.composite
def _id_runs(draw, tok, sp, control: bool):
    """Ids mixing random pieces, whole characters as byte pieces, and broken ones."""
    normal = [i for i in range(tok.vocab_size) if not sp.is_control(i)]
    ids: list[int] = []
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["piece", "piece", "char", "partial", "control"]
                                    if control else ["piece", "piece", "char", "partial"]))
        if kind == "piece":
            ids.append(draw(st.sampled_from(normal)))
        elif kind == "control":
            ids.append(draw(st.sampled_from([1, 2])))
        else:
            ch = draw(st.characters(min_codepoint=0x80, blacklist_categories=("Cs",)))
            data = ch.encode()
            if kind == "partial":
                data = data[:draw(st.integers(1, len(data)))]
            ids += [sp.piece_to_id(f"<0x{b:02X}>") for b in data]
    return ids


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_stream_property(tok, sp, data):
    generated = data.draw(_id_runs(tok, sp, control=False), label="generated")
    prompt = data.draw(st.one_of(st.just([]), _id_runs(tok, sp, control=True)), label="prompt")
    if prompt:  # a prompt that stops inside a character has no well-defined continuation
        assume(not tok.decode(prompt).endswith("\ufffd"))
    _check_chunks(_stream(tok, generated, prompt), _expected(tok, generated, prompt))


@settings(max_examples=100, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",)), max_size=30),
       st.text(st.characters(blacklist_categories=("Cs",)), max_size=30))
def test_stream_real_text(tok, prompt_text, text):
    prompt = tok.encode(prompt_text) if prompt_text else []
    generated = tok.encode(text)
    _check_chunks(_stream(tok, generated, prompt), _expected(tok, generated, prompt))


def test_stream_leading_space_after_prompt(tok, sp):
    generated = tok.encode("the answer")
    assert sp.id_to_piece(generated[0]) == "▁the"
    prompt = tok.encode("What is it? It is")
    assert _stream(tok, generated, prompt)[0] == " the"
    assert "".join(_stream(tok, generated, prompt)) == " the answer"
    # No context: the first piece's space goes, as in sentencepiece's decode.
    assert _stream(tok, generated)[0] == "the"
    # A chat prompt ends in "[/INST]"; after a prompt that ends with control ids, the space stays.
    chat = tok.encode_chat([Message("user", "hi")])
    assert "".join(_stream(tok, generated, chat)) == " the answer"
    ending_in_eos = [*tok.encode("x"), tok.eos_id, tok.eos_id, tok.bos_id] + [tok.bos_id] * 8
    assert "".join(_stream(tok, generated, ending_in_eos)) == " the answer"
    assert tok.decode(ending_in_eos + generated) == "x the answer"


def test_stream_newlines_and_controls(tok):
    generated = tok.encode("line one\n\n  line two\n")
    dec = tok.stream_decoder(tok.encode("Prompt:"))
    out = "".join(dec.push(i) for i in generated)
    assert dec.push(tok.eos_id) == ""
    assert out + dec.flush() == " line one\n\n  line two\n"


def test_stream_multibyte_character_emitted_whole(tok, sp):
    ids = tok.encode("a😀")
    emoji = ids[-4:]
    assert all(sp.is_byte(i) for i in emoji)
    for prompt in ([], tok.encode("Say:")):
        dec = tok.stream_decoder(prompt)
        got = [dec.push(i) for i in ids]
        assert got[-4:-1] == ["", "", ""]
        assert got[-1] == "😀"
        assert dec.flush() == ""
    # Cut short: the unfinished character comes out of flush as sentencepiece decodes it.
    dec = tok.stream_decoder()
    assert [dec.push(i) for i in emoji[:2]] == ["", ""]
    assert dec.flush() == tok.decode(emoji[:2]) == "\ufffd\ufffd"


def test_stream_window_stays_small(model_dir):
    """Each push decodes a bounded number of ids, however long the generation."""
    tok = Tokenizer.from_dir(model_dir)
    seen = []

    class CountingProcessor:
        def __init__(self, inner):
            self.inner = inner

        def decode(self, ids):
            seen.append(len(ids))
            return self.inner.decode(ids)

    source = inspect.getsource(json.encoder)
    prompt, generated = tok.encode(source), tok.encode(source) * 2
    assert len(generated) > 2000
    expected = _expected(tok, generated, prompt)
    tok._sp = CountingProcessor(tok._sp)
    assert "".join(_stream(tok, generated, prompt)) == expected
    assert max(seen) < 20
