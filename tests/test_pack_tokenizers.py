"""A checkpoint whose tokenizer is a tokenizer.json alone (Qwen, OLMoE: byte-level BPE, no bos)
through `offload convert`, `generate` and `bench`, against transformers' own tokenizer and model
on the source directory; and the checkpoints convert refuses for their tokenizer.

The checkpoint is tests.test_tokenizer_json's ``write_json_checkpoint``: the tiny windowed Mixtral
saved by transformers, with a byte-level BPE tokenizer.json, its chat template in
chat_template.jinja and no tokenizer.model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from offload.bench import BenchConfig, load, measure
from offload.engine import Engine
from offload.errors import TokenizerError
from offload.pack import MANIFEST, convert
from offload.tokenizer import JsonTokenizer, Message, Tokenizer
from tests.model_builder import WINDOWED, rewrite_config
from tests.test_hub import one_line, run_cli
from tests.test_tokenizer_json import MIXED, write_json_checkpoint

PROMPT = "def parse_args(argv):"
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return write_json_checkpoint(tmp_path_factory.mktemp("json") / "qwen-style")


@pytest.fixture(scope="module")
def pack(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("json-pack") / "pack"
    result = run_cli("convert", str(source), str(out), "--dtype", "float32")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def hf(source):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(source))


@pytest.fixture()
def one_thread():
    """Timed runs on one thread, as tests/test_bench.py has them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_convert_copies_the_tokenizer_json_files(source, pack):
    manifest = json.loads((pack / MANIFEST).read_text())
    assert manifest["tokenizer_files"] == TOKENIZER_FILES  # what the checkpoint has, and only that
    for name in TOKENIZER_FILES:
        assert (pack / name).read_bytes() == (source / name).read_bytes(), name
    assert not (pack / "tokenizer.model").exists()


def test_the_packs_tokenizer_gives_transformers_ids(pack, hf):
    tok = Tokenizer.from_dir(pack)
    assert isinstance(tok, JsonTokenizer) and tok.bos_id is None and hf.bos_token is None
    assert tok.source == str(pack / "tokenizer.json")
    for text in [PROMPT, MIXED, "a<|im_end|>b", " x  y\n\n"]:
        assert tok.encode(text, bos=True) == hf(text)["input_ids"], text
        assert tok.decode(tok.encode(text)) == hf.decode(hf(text)["input_ids"], skip_special_tokens=True)
    assert tok.eos_id == hf.convert_tokens_to_ids("<|im_end|>")
    # the template is chat_template.jinja's, which the pack must carry for these to agree
    messages = [Message("system", "Be brief."), Message("user", "Hello 🙂"), Message("assistant", "Hi"),
                Message("user", "again")]
    expected = hf.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                      tokenize=True, add_generation_prompt=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert tok.encode_messages(messages) == list(expected)


def _transformers_greedy(source: Path, ids: list[int], n: int) -> list[int]:
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids):]


def test_generate_on_the_pack(source, pack, hf):
    args = ["-p", PROMPT, "-n", "8", "--temp", "0", "--dtype", "float32", "--json", "--ignore-eos"]
    result = run_cli("generate", str(pack), *args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["prompt_tokens"] == hf(PROMPT)["input_ids"]  # no bos: Qwen's tokenizer adds none
    assert out["tokens"] == _transformers_greedy(source, out["prompt_tokens"], 8)
    assert out["text"] == hf.decode(out["tokens"], skip_special_tokens=True)
    chat = run_cli("generate", str(pack), "--chat", *args)
    assert chat.exit_code == 0, chat.output
    expected = hf.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=True, add_generation_prompt=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert json.loads(chat.stdout)["prompt_tokens"] == list(expected)


def test_bench_on_the_pack_has_no_bos(pack, one_thread):
    result = run_cli("bench", str(pack), "-p", "8", "-n", "4", "-pg", "4,2", "-d", "0,8", "-r", "1",
                     "--dtype", "float32", "-o", "json")
    assert result.exit_code == 0, result.output
    assert [r["test"] for r in json.loads(result.stdout)] == [
        "pp8", "tg4", "pp4+tg2", "pp8 @ d8", "tg4 @ d16", "pp4+tg2 @ d8"]


def test_bench_prompts_without_bos(pack, monkeypatch, one_thread):
    config = BenchConfig(dtype="float32")
    engine = load(pack, config, 64)
    tok = engine.tokenizer
    assert tok.bos_id is None
    assert tok.special_ids == {tok._hf.token_to_id(s) for s in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
    prompts, prefilled, forwarded = [], [], []
    generate, prefill, forward = engine.generate, engine.prefill, engine.model.forward
    monkeypatch.setattr(engine, "generate", lambda ids, settings: prompts.append(list(ids)) or generate(ids, settings))
    monkeypatch.setattr(engine, "prefill", lambda ids: prefilled.append(list(ids)) or prefill(ids))
    monkeypatch.setattr(engine.model, "forward",
                        lambda tokens, last_only=False: forwarded.append(tokens.tolist()) or forward(tokens, last_only))
    seen = {}
    try:
        for name, prompt_tokens, depth in (("plain", 8, 0), ("depth", 8, 16), ("empty", 0, 0)):
            measure(engine, config, prompt_tokens, 2, 1, depth=depth)  # a warm-up, then one timed request
            seen[name] = (list(prompts), list(prefilled), list(forwarded))
            for captured in (prompts, prefilled, forwarded):
                captured.clear()
    finally:
        engine.close()
    vocab = tok.vocab_size  # the model's 512: ids are drawn from [3, 509), the 3 specials above
    assert vocab == 512
    eight, sixteen, one = (random_ids_in(vocab, n, seed) for n, seed in ((8, 0), (16, 1), (1, 0)))
    assert seen["plain"][0] == [eight] * 2  # eight random ids, no bos, in both requests
    assert seen["depth"][0] == [] and seen["depth"][1] == [sixteen] * 2  # the depth: 16 random ids, no bos
    assert [ids for ids in seen["depth"][2] if len(ids) == 8] == [eight] * 2  # then the prompt: 8 ids
    assert seen["empty"][0] == [one] * 2  # -p 0: one random id to start from
    assert not tok.special_ids & set(eight + sixteen + one)


def random_ids_in(vocab: int, n: int, seed: int) -> list[int]:
    """The ids bench draws, by hand: random.Random(seed).randrange(3, vocab), specials (the top 3
    of this tokenizer) drawn again."""
    import random

    rng, out = random.Random(seed), []
    while len(out) < n:
        i = rng.randrange(3, vocab)
        if i < vocab - 3:
            out.append(i)
    return out


# ---- what convert refuses, and what it keeps ---------------------------------------------------


def test_a_checkpoint_without_a_tokenizer_is_refused(source, tmp_path):
    d = tmp_path / "no-tokenizer"
    shutil.copytree(source, d)
    (d / "tokenizer.json").unlink()
    out = tmp_path / "pack"
    line = one_line(run_cli("convert", str(d), str(out)))
    assert line == f"error: {d}: neither tokenizer.model nor tokenizer.json; a pack carries the model's tokenizer"
    assert not out.exists() and not any(p.name.startswith(".pack") for p in tmp_path.iterdir())
    engine_line = one_line(run_cli("generate", str(d), "-p", "x"))
    assert f"{d / 'tokenizer.model'}: no such file, nor tokenizer.json" in engine_line


def test_a_tokenizer_json_that_does_not_load_is_refused_before_writing(source, tmp_path):
    d = tmp_path / "broken"
    shutil.copytree(source, d)
    (d / "tokenizer.json").write_text("{not json")
    out = tmp_path / "pack"
    line = one_line(run_cli("convert", str(d), str(out)))
    assert str(d / "tokenizer.json") in line
    assert not out.exists()


def test_a_vocabulary_larger_than_the_model_names_tokenizer_json(source, tmp_path):
    d = tmp_path / "small-model"
    shutil.copytree(source, d)
    rewrite_config(d, vocab_size=400)  # the tokenizer has 512 tokens
    with pytest.raises(TokenizerError) as e:
        Engine.load(d, device="cpu", dtype="float32")
    assert str(e.value) == f"{d / 'tokenizer.json'}: 512 tokens but the model has only 400 embeddings"


def test_both_tokenizers_are_carried_and_force_drops_the_old_ones(source, model_dirs, tmp_path):
    both = tmp_path / "both"
    shutil.copytree(model_dirs[WINDOWED.name], both)
    shutil.copy(source / "tokenizer.json", both / "tokenizer.json")  # as Mixtral's repos have both
    out = convert(both, tmp_path / "pack", dtype=torch.float32)
    files = json.loads((out / MANIFEST).read_text())["tokenizer_files"]
    assert files[:2] == ["tokenizer.model", "tokenizer.json"] and (out / "tokenizer.json").is_file()
    assert type(Tokenizer.from_dir(out)) is Tokenizer  # sentencepiece first, as on the checkpoint
    assert Tokenizer.from_dir(out).encode(PROMPT, bos=True) == Tokenizer.from_dir(both).encode(PROMPT, bos=True)

    convert(source, out, dtype=torch.float32, force=True)  # the old pack's tokenizer.model goes with it
    assert not (out / "tokenizer.model").exists()
    assert isinstance(Tokenizer.from_dir(out), JsonTokenizer)
    assert json.loads((out / MANIFEST).read_text())["tokenizer_files"] == TOKENIZER_FILES


def test_padding_ids_past_the_tokenizer_decode_to_nothing(tmp_path):
    """A model with more embedding rows than its tokenizer has tokens (Qwen: 151936 rows for
    151669 tokens) may sample a padding id: its text is "", as transformers' decode gives."""
    from offload.errors import TokenizerError
    from offload.tokenizer import Tokenizer
    from tests.test_tokenizer_json import write_json_tokenizer

    d = write_json_tokenizer(tmp_path / "tok", vocab_size=400)
    tok = Tokenizer.from_dir(d)
    n = tok.vocab_size
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode([5, n])
    tok.pad_to(n + 10)
    ids = tok.encode("hello world")
    assert tok.decode([*ids, n, n + 9]) == tok.decode(ids)
    stream = tok.stream_decoder()
    text = "".join(stream.push(i) for i in [ids[0], n + 3, *ids[1:]]) + stream.flush()
    assert text == tok.decode(ids)
    assert tok.id_to_piece(n + 1) == ""
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode([n + 10])
