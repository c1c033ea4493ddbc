"""The decode loop: limits, stop strings, EOS, streaming, seeds and statistics."""

from __future__ import annotations

import pytest
import torch

from offload.engine import Engine, GenerationSettings, StopMatcher
from offload.errors import SettingError
from offload.sampling import SamplingSettings
from offload.tokenizer import Tokenizer
from tests.model_builder import WINDOWED

PROMPT = "class ArgumentParser:\n    def add_argument(self"


@pytest.fixture(scope="module")
def engine(model_dirs) -> Engine:
    return Engine.load(model_dirs[WINDOWED.name], device="cpu", dtype="float32")


def prompt_ids(engine: Engine) -> list[int]:
    return engine.tokenizer.encode(PROMPT, bos=True)


def greedy(n: int, **kw) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=n, ignore_eos=True, **kw)


def test_greedy_generates_exactly_n_tokens_and_streams_its_text(engine):
    ids = prompt_ids(engine)
    gen = engine.generate(ids, greedy(40))
    events = list(gen)
    assert len(gen.tokens) == 40 and [e.token_id for e in events] == gen.tokens
    streamed = "".join(e.text for e in events)
    assert streamed == gen.text
    full = engine.tokenizer.decode(ids + gen.tokens)
    assert gen.text == full[len(engine.tokenizer.decode(ids)) :]
    s = gen.stats
    assert (s.prompt_tokens, s.generated_tokens, s.decode_steps, s.stop_reason) == (len(ids), 40, 39, "length")
    assert s.prompt_tokens_per_s > 0 and s.generation_tokens_per_s > 0


def test_zero_tokens_runs_nothing(engine):
    gen = engine.generate(prompt_ids(engine), greedy(0)).run()
    assert gen.tokens == [] and gen.stats.stop_reason == "length"


def test_stop_string_ends_and_trims_the_text(engine):
    ids = prompt_ids(engine)
    full = engine.generate(ids, greedy(40)).run()
    text = full.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert len(stop) == 3
    gen = engine.generate(ids, greedy(40, stop=(stop,))).run()
    assert gen.stats.stop_reason == "stop"
    assert gen.text == text[: text.index(stop)]
    assert gen.tokens == full.tokens[: len(gen.tokens)] and len(gen.tokens) < 40


def test_eos_ends_generation(engine, model_dirs):
    ids = prompt_ids(engine)
    reference = engine.generate(ids, greedy(20)).run().tokens
    eos = reference[5]
    first = reference.index(eos)
    original = engine.tokenizer
    engine.tokenizer = Tokenizer.from_file(model_dirs[WINDOWED.name] / "tokenizer.model", eos_ids=[eos])
    try:
        gen = engine.generate(ids, GenerationSettings(max_new_tokens=20)).run()
    finally:
        engine.tokenizer = original
    assert gen.tokens == reference[: first + 1]
    assert gen.stats.stop_reason == "eos"


def test_context_length_bounds_generation(model_dirs):
    small = Engine.load(model_dirs[WINDOWED.name], device="cpu", dtype="float32", context_length=32)
    ids = small.tokenizer.encode(PROMPT, bos=True)
    assert len(ids) < 32
    gen = small.generate(ids, greedy(100)).run()
    assert len(gen.tokens) == 32 - len(ids) and gen.stats.stop_reason == "context"
    with pytest.raises(SettingError, match="exceeds the context length 32"):
        small.generate(list(range(3, 40)), greedy(1))


def test_same_seed_same_tokens_and_seeds_matter(engine):
    ids = prompt_ids(engine)
    sampled = lambda seed: engine.generate(  # noqa: E731
        ids, greedy(24, sampling=SamplingSettings(temperature=1.0, top_p=0.95, seed=seed))
    ).run().tokens
    assert sampled(11) == sampled(11)
    assert len({tuple(sampled(s)) for s in range(4)}) > 1


def test_decode_after_prefill_equals_full_forward(engine):
    ids = prompt_ids(engine)
    full = engine.logits(ids + [100, 200])  # [T+2, V]
    step0 = engine.prefill(ids)
    step1 = engine.decode(100)
    step2 = engine.decode(200)
    for got, want in [(step0, full[-3]), (step1, full[-2]), (step2, full[-1])]:
        assert (got - want).abs().max() < 1e-5


def test_stop_matcher_holds_back_possible_prefixes():
    m = StopMatcher(["</end>"])
    assert m.feed("hello </") == ("hello ", False)
    assert m.feed("e") == ("", False)
    assert m.feed("x") == ("</ex", False)
    assert m.feed(" a</end> tail") == (" a", True)


def test_bad_requests_are_refused(engine):
    with pytest.raises(SettingError, match="empty"):
        engine.generate([], greedy(1))
    with pytest.raises(SettingError):
        GenerationSettings(stop=("",))
    with pytest.raises(SettingError, match="--dtype"):
        Engine.load(".", dtype="int3")
    with pytest.raises(SettingError, match="CUDA is not available"):
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        Engine.load(".", device="cuda")


@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_a_prompt_in_chunks_gives_the_unchunked_logits(chunk, model_dirs, tmp_path):
    """Prefill runs in chunks of ``prefill_chunk`` tokens (the size the device reserve is planned
    for): the next-token logits equal a whole-prompt forward within fp32 rounding, the greedy
    continuation is the same, every cache budget stays bit-identical to the all-resident run at
    that chunk size, and a trace records one line per prompt token."""
    from offload.trace import load_trace

    path = model_dirs[WINDOWED.name]
    whole = Engine.load(path, device="cpu", dtype="float32")
    ids = [1] + list(range(7, 47))  # 41 tokens: longer than the window (24) and than the chunks
    want = whole.logits(ids)[-1]
    want_tokens = whole.generate(ids, greedy(8)).run().tokens
    chunked = Engine.load(path, device="cpu", dtype="float32")
    cached = Engine.load(path, device="cpu", dtype="float32", experts_per_layer=2, ram=0, policy="lru")
    chunked.prefill_chunk = cached.prefill_chunk = chunk
    assert torch.allclose(chunked.prefill(ids), want, atol=1e-5, rtol=0)
    gen = chunked.generate(ids, greedy(8, trace=tmp_path / "run.jsonl")).run()
    assert gen.tokens == want_tokens
    assert [s.phase for s in load_trace(tmp_path / "run.jsonl").sequences[0].steps] == ["prefill"] * 41 + ["decode"] * 7
    assert torch.equal(cached.prefill(ids), chunked.prefill(ids))
    assert cached.generate(ids, greedy(8)).run().tokens == want_tokens
