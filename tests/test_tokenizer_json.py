"""offload's tokenizer.json path (byte-level BPE, as Qwen and OLMoE ship) against transformers.

A tiny tokenizer with Qwen2's structure (NFC, Qwen's split regex, byte-level BPE, ChatML special
tokens added after the vocabulary) is trained with the ``tokenizers`` library
(``tests.tokenizer_builder.write_json_tokenizer``); ``write_json_checkpoint`` puts one next to a tiny transformers Mixtral
as a Qwen-style checkpoint (tokenizer.json, no tokenizer.model, no bos) for the pack, CLI and hub
tests.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from offload.errors import TokenizerError
from offload.tokenizer import JsonTokenizer, Message, Tokenizer
from tests.tokenizer_builder import write_json_tokenizer, write_tokenizer

MIXED = ("def f(x):\n    return x  # 日本語のコメント\n\n\n\tif  x   >  1:\t\n"
         "Emoji 🙂🚀👍🏽❤️ and 中文字符，还有 한국어; café naïve Größe\r\n   trailing   ")


# BPE tokens of write_json_checkpoint's tokenizer: with its 3 specials, the model's 512. (Qwen's
# tokenizer has fewer tokens than its model has embeddings; a random tiny model, unlike a trained
# one, samples the rows past the tokenizer's, which no tokenizer decodes.)
JSON_VOCAB = 509


def write_json_checkpoint(out_dir: Path) -> Path:
    """A Qwen-style checkpoint in ``out_dir``: the tiny windowed Mixtral of tests.model_builder
    saved by transformers (``save_pretrained``) with ``write_json_tokenizer``'s files and no
    tokenizer.model; the chat template in chat_template.jinja, as transformers 5 saves it, and
    config.json naming the tokenizer's <|endoftext|> and <|im_end|> as bos and eos token ids, as
    Qwen3-MoE's does (its tokenizer adds no bos)."""
    from tests.model_builder import WINDOWED, TinyShape, build_reference

    out_dir = Path(out_dir)
    write_json_tokenizer(out_dir, vocab_size=JSON_VOCAB)
    generation = (out_dir / "generation_config.json").read_text()  # save_pretrained writes its own
    config = json.loads((out_dir / "tokenizer_config.json").read_text())
    (out_dir / "chat_template.jinja").write_text(config.pop("chat_template"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    ids = {t["content"]: int(i) for i, t in config["added_tokens_decoder"].items()}
    shape = TinyShape("json-tokenizer", {**WINDOWED.overrides, "bos_token_id": ids["<|endoftext|>"],
                                         "eos_token_id": ids["<|im_end|>"]})
    build_reference(shape).save_pretrained(out_dir, max_shard_size="150KB")
    (out_dir / "generation_config.json").write_text(generation)
    assert not (out_dir / "tokenizer.model").exists()
    return out_dir


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return write_json_tokenizer(tmp_path_factory.mktemp("qwen_tok"))


@pytest.fixture(scope="module")
def tok(tok_dir) -> Tokenizer:
    return Tokenizer.from_dir(tok_dir)


@pytest.fixture(scope="module")
def hf(tok_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


def test_from_dir_picks_tokenizer_json(tok):
    assert isinstance(tok, JsonTokenizer)


def test_round_trip_mixed_text(tok):
    ids = tok.encode(MIXED)
    assert len(ids) < len(MIXED.encode())  # merges happened: not just bytes
    assert tok.decode(ids) == MIXED


def test_ids_match_transformers(tok, hf):
    for text in [MIXED, "hello world", "    indented\n\n\n", "🙂", "  ", "x" * 50]:
        assert tok.encode(text) == hf(text, add_special_tokens=False)["input_ids"], text
        assert tok.encode(text) == hf(text)["input_ids"], text  # Qwen adds no bos
        assert tok.decode(tok.encode(text)) == hf.decode(hf(text)["input_ids"])


def test_no_bos(tok):
    assert tok.bos_id is None
    assert tok.encode("hi", bos=True) == tok.encode("hi")


def test_special_tokens_in_text_are_ids(tok, hf):
    text = "a<|im_end|>b<|endoftext|>"
    assert tok.encode(text) == hf(text)["input_ids"]
    assert tok.eos_id in tok.encode(text)
    assert tok.decode(tok.encode(text)) == "ab"


def test_eos_from_tokenizer_config_and_generation_config(tok, tok_dir):
    gen = json.loads((tok_dir / "generation_config.json").read_text())
    assert tok.eos_id == tok._hf.token_to_id("<|im_end|>")
    assert tok.eos_ids == frozenset(gen["eos_token_id"])
    assert tok.vocab_size == tok._hf.get_vocab_size(with_added_tokens=True)


def test_eos_int_in_generation_config(tok_dir, tmp_path):
    d = tmp_path / "t"
    shutil.copytree(tok_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["eos_token"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 5}))
    t = Tokenizer.from_dir(d)
    assert t.eos_id == 5 and t.eos_ids == frozenset({5})


def test_chat_ids_match_transformers(tok, hf):
    conversations = [
        [Message("user", "Hello 🙂! 日本語で答えて。")],
        [Message("system", "Be brief.\n"), Message("user", "def f():\n    pass"),
         Message("assistant", "ok  "), Message("user", "again")],
    ]
    for messages in conversations:
        dicts = [{"role": m.role, "content": m.content} for m in messages]
        expected = hf.apply_chat_template(dicts, tokenize=True, add_generation_prompt=True)
        if isinstance(expected, dict) or hasattr(expected, "keys"):
            expected = expected["input_ids"]
        assert tok.encode_messages(messages) == list(expected)
        prompt = tok.encode("<|im_start|>assistant\n")
        assert prompt[0] == tok._hf.token_to_id("<|im_start|>")
        assert tok.encode_messages(messages)[-len(prompt):] == prompt


def _stream(tok, ids):
    decoder = tok.stream_decoder()
    chunks = [decoder.push(i) for i in ids]
    chunks.append(decoder.flush())
    return chunks, decoder.text


def test_stream_split_characters(tok):
    text = "🙂🚀👍🏽 中文字符 한국어 ❤️ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 end"
    ids = tok.encode(text)
    # The tiny vocabulary has no merge for these characters: each is several byte ids.
    assert len(ids) > len(text) + 5
    chunks, streamed = _stream(tok, ids)
    assert "".join(chunks) == streamed == tok.decode(ids) == text
    assert not any("\ufffd" in c for c in chunks)
    assert "" in chunks  # something was held back mid-character
    for c in chunks:  # every chunk is whole characters: it survives its own UTF-8 round trip
        assert c.encode("utf-8").decode("utf-8") == c


def test_stream_matches_decode_on_random_ids(tok):
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 12))]
        _, streamed = _stream(tok, ids)
        assert streamed == tok.decode(ids), ids


def test_stream_with_prompt_and_specials(tok):
    prompt = tok.encode_messages([Message("user", "hi")])
    ids = tok.encode("Bonjour 🙂") + [tok.eos_id]
    decoder = tok.stream_decoder(prompt)
    out = "".join(decoder.push(i) for i in ids) + decoder.flush()
    assert out == "Bonjour 🙂"


def test_both_files_use_sentencepiece(tok_dir, tmp_path):
    d = tmp_path / "mixtral"
    write_tokenizer(d)
    shutil.copy(tok_dir / "tokenizer.json", d / "tokenizer.json")
    t = Tokenizer.from_dir(d)
    assert type(t) is Tokenizer
    assert t.bos_id == 1 and t.encode("hi", bos=True)[0] == 1


@pytest.mark.parametrize("content", [b"{not json", b'{"version": "1.0", "model": 3, "decoder": {"type": "ByteLevel"}}',
                                     b"\xff\xfe"])
def test_broken_tokenizer_json(tok_dir, tmp_path, content):
    d = tmp_path / "broken"
    shutil.copytree(tok_dir, d)
    (d / "tokenizer.json").write_bytes(content)
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_dir(d)
    message = str(e.value)
    assert str(d / "tokenizer.json") in message
    assert "\n" not in message


def test_unsupported_decoder(tok_dir, tmp_path):
    d = tmp_path / "meta"
    shutil.copytree(tok_dir, d)
    spec = json.loads((d / "tokenizer.json").read_text())
    spec["decoder"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
    (d / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(TokenizerError, match="byte-level"):
        Tokenizer.from_dir(d)


def test_out_of_range_ids(tok):
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.stream_decoder().push(-1)
