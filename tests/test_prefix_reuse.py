"""Prefix reuse: the engine keeps the sequence its KV cache holds, and a prompt sharing a prefix
with it prefills only the rest.

The oracles are engines that never reused anything: a fresh full prefill of the whole prompt,
bit for bit where the two run the same forward passes by construction (the kept prefix ends on
a chunk boundary, since chunks are aligned to positions), within fp32 rounding elsewhere (a
chunk's rows round differently with the chunk's size on a CPU); and, for conversations whose
replies were decoded, an engine replaying the same passes in order with no reuse logic at all
(prefill, decode steps, then the next turn's tokens appended). Every cache budget is run.

With the windowed shape's KV cache a ring (chunks of 8: 24 + 8 slots), a held prefix is reused
only when the ring still holds what its next position attends to; the oracle for that is a set
computation here (the last 32 positions written, against the 23 before the first new one).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offload.engine import Engine, GenerationSettings, PrefillInterrupted
from offload.errors import SettingError
from tests.model_builder import WINDOWED

CHUNK = 8  # small prompt chunks, so that short sequences cross several chunk boundaries
BUDGETS = {
    "resident": {},
    "cache": {"experts_per_layer": 2, "policy": "lru"},
    "disk": {"experts_per_layer": 2, "ram": 0},  # every miss reads the checkpoint
}
TOKENS = st.integers(3, 500)  # ids the tiny tokenizer holds (0-2: unk, bos, eos)
# the same budgets with the KV cache a ring of window + CHUNK slots (batch_size=CHUNK at load)
RING_BUDGETS = {
    "ring": {},
    "ring, cache": {"experts_per_layer": 2, "policy": "lru"},
}
EVERY_BUDGET = [*BUDGETS, *RING_BUDGETS]
WINDOW = WINDOWED.config_kwargs()["sliding_window"]
SLOW = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def engines(model_dirs) -> dict[str, tuple[Engine, Engine]]:
    """budget -> (the engine under test, an oracle engine with the same budget)."""
    out = {}
    for name, budget in BUDGETS.items():
        pair = tuple(Engine.load(model_dirs[WINDOWED.name], device="cpu", dtype="float32", **budget)
                     for _ in range(2))
        for engine in pair:
            engine.prefill_chunk = CHUNK
        out[name] = pair
    for name, budget in RING_BUDGETS.items():
        out[name] = tuple(Engine.load(model_dirs[WINDOWED.name], device="cpu", dtype="float32", batch_size=CHUNK,
                                      **budget) for _ in range(2))
        assert out[name][0].model.cache.capacity == WINDOW + CHUNK
    return out


def fresh(engine: Engine, ids: list[int]) -> torch.Tensor:
    """The oracle's logits [V] after ``ids``: a new sequence, every token prefilled."""
    return engine.prefill(ids)


def greedy(n: int, reuse: bool = True) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=n, ignore_eos=True, reuse_prefix=reuse)


def lcp(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@pytest.mark.parametrize("budget", BUDGETS)
@SLOW
@given(data=st.data())
def test_a_prefix_kept_to_a_chunk_boundary_is_bit_identical_to_a_fresh_prefill(engines, budget, data):
    """An earlier request, then a prompt that diverges from it at a chunk boundary: the logits
    and the greedy continuation equal a fresh engine's full prefill bit for bit, and only the
    new tokens are prefilled (also after a request on the other branch in between)."""
    engine, oracle = engines[budget]
    chunks = data.draw(st.integers(1, 4), label="chunks kept")
    kept = [1] + data.draw(st.lists(TOKENS, min_size=chunks * CHUNK - 1, max_size=chunks * CHUNK - 1))
    before = kept + data.draw(st.lists(TOKENS, min_size=1, max_size=20), label="the earlier request's tail")
    tail = data.draw(st.lists(TOKENS, min_size=1, max_size=20).filter(lambda t: t[0] != before[len(kept)]))
    prompt = kept + tail
    # the earlier request prefilled whole: its positions ran in the chunks a fresh prefill runs
    engine.generate(before, greedy(data.draw(st.integers(1, 6)), reuse=False)).run()

    want_logits = fresh(oracle, prompt)
    want = oracle.generate(prompt, greedy(5, reuse=False)).run()
    assert engine.reusable_prefix(prompt) == len(kept)
    assert torch.equal(engine.prefill(prompt, reuse=True), want_logits)
    engine.generate(before, greedy(2)).run()  # back to the other branch
    gen = engine.generate(prompt, greedy(5)).run()
    assert gen.tokens == want.tokens
    assert (gen.stats.reused_tokens, gen.stats.prompt_tokens) == (len(kept), len(tail))
    assert engine.sequence == tuple(prompt + gen.tokens[:-1])


@pytest.mark.parametrize("budget", EVERY_BUDGET)
@SLOW
@given(data=st.data())
def test_a_conversation_equals_the_same_passes_run_without_reuse(engines, budget, data):
    """Turns of user tokens and greedy replies, each turn's prompt the whole conversation so far:
    every reply (tokens and first logits) equals, bit for bit, an engine that ran the same
    passes in order (prefill, the decode steps, then the next turn's tokens appended) with no
    reuse logic; each turn prefills only what follows the held sequence."""
    engine, oracle = engines[budget]
    engine.reset()
    turns = data.draw(st.lists(st.lists(TOKENS, min_size=1, max_size=14), min_size=2, max_size=4), label="turns")
    conversation: list[int] = [1]
    oracle.reset()
    held = 0  # positions the oracle's cache holds
    for n, user in enumerate(turns):
        conversation += user
        replies = data.draw(st.integers(1, 5), label=f"reply {n} length")
        gen = engine.generate(conversation, greedy(replies)).run()
        want_logits = oracle.extend(conversation[held:])  # the oracle: the next tokens appended
        want_tokens = [int(want_logits.argmax())]
        while len(want_tokens) < replies:
            want_tokens.append(int(oracle.decode(want_tokens[-1]).argmax()))
        assert gen.tokens == want_tokens
        assert gen.stats.reused_tokens == held and gen.stats.prompt_tokens == len(conversation) - held
        conversation += gen.tokens
        held = len(conversation) - 1  # the last token sampled never ran
        assert engine.sequence == oracle.sequence == tuple(conversation[:held])


@pytest.mark.parametrize("budget", BUDGETS)
@SLOW
@given(data=st.data())
def test_a_prefix_kept_anywhere_gives_the_fresh_prefill_within_rounding(engines, budget, data):
    """Divergence at any position (inside a chunk too, or the whole prompt held already): the
    logits equal a fresh full prefill's within fp32 rounding, and the greedy token is the same
    wherever the oracle's top two are not a near tie."""
    engine, oracle = engines[budget]
    before = [1] + data.draw(st.lists(TOKENS, min_size=1, max_size=40), label="earlier")
    keep = data.draw(st.integers(1, len(before)), label="common prefix")
    prompt = before[:keep] + data.draw(st.lists(TOKENS, max_size=20), label="new tail")
    engine.generate(before, greedy(data.draw(st.integers(1, 4)))).run()
    want = fresh(oracle, prompt)
    got = engine.prefill(prompt, reuse=True)
    assert torch.allclose(got, want, atol=1e-4, rtol=0)
    top = want.topk(2).values
    if top[0] - top[1] > 1e-3:
        assert got.argmax() == want.argmax()
    assert engine.sequence == tuple(prompt)


def test_a_whole_prompt_held_runs_its_last_token_again(engines):
    engine, oracle = engines["cache"]
    ids = [1] + list(range(10, 10 + 2 * CHUNK))  # 17 tokens: the last one starts a chunk
    engine.prefill(ids)
    gen = engine.generate(ids, greedy(4)).run()
    assert (gen.stats.reused_tokens, gen.stats.prompt_tokens) == (len(ids) - 1, 1)
    assert gen.tokens == oracle.generate(ids, greedy(4, reuse=False)).run().tokens
    assert torch.equal(engine.prefill(ids, reuse=True), fresh(oracle, ids))


def test_the_default_chunk_is_aligned_too(model_dirs):
    """The real chunk size (256): a prompt kept to 256 positions, then 200 new ones, is bit
    identical to a fresh prefill of all 456."""
    engine = Engine.load(model_dirs[WINDOWED.name], device="cpu", dtype="float32", experts_per_layer=3)
    oracle = Engine.load(model_dirs[WINDOWED.name], device="cpu", dtype="float32", experts_per_layer=3)
    assert engine.prefill_chunk == 256
    g = torch.Generator().manual_seed(0)
    ids = [1] + torch.randint(3, 500, (455,), generator=g).tolist()
    engine.prefill(ids[:256] + [7, 8, 9])
    assert torch.equal(engine.prefill(ids, reuse=True), oracle.prefill(ids))


@pytest.mark.parametrize("budget", EVERY_BUDGET)
def test_a_stopped_prefill_keeps_the_chunks_that_ran(engines, budget):
    """``should_stop`` between chunks: PrefillInterrupted, the sequence holds whole chunks, and
    continuing from there gives the fresh full prefill bit for bit."""
    engine, oracle = engines[budget]
    ids = [1] + [(7 * i) % 490 + 3 for i in range(5 * CHUNK)]
    asked = []
    with pytest.raises(PrefillInterrupted) as stop:
        engine.prefill(ids, should_stop=lambda: asked.append(1) or len(asked) > 3)
    assert stop.value.done == 3 * CHUNK and engine.sequence == tuple(ids[: 3 * CHUNK])
    assert torch.equal(engine.prefill(ids, reuse=True), fresh(oracle, ids))

    asked.clear()
    gen = engine.generate(ids + [5, 6], greedy(3), should_stop=lambda: True)
    assert list(gen) == [] and gen.stats.stop_reason == "interrupted" and gen.stats.prompt_tokens == 0


@pytest.mark.parametrize("budget", EVERY_BUDGET)
def test_a_keyboard_interrupt_inside_a_pass_leaves_a_consistent_sequence(engines, budget):
    """Ctrl+C raised inside a forward pass (here between two layers of the third chunk): the
    sequence is what the KV cache holds, and a reuse prefill from there is exact."""
    engine, oracle = engines[budget]
    ids = [1] + [(11 * i) % 490 + 3 for i in range(4 * CHUNK)]
    calls = []

    def observer(layer, experts, weights):
        calls.append(layer)
        if len(calls) == 2 * engine.config.num_hidden_layers + 2:
            raise KeyboardInterrupt

    engine.model.routing_observer = observer
    try:
        with pytest.raises(KeyboardInterrupt):
            engine.prefill(ids)
    finally:
        engine.model.routing_observer = None
    assert engine.sequence == tuple(ids[: 2 * CHUNK]) and engine.model.cache.length == 2 * CHUNK
    assert torch.equal(engine.prefill(ids, reuse=True), fresh(oracle, ids))


def test_reset_and_traces_and_direct_forwards_prefill_everything(engines, tmp_path):
    engine, _ = engines["resident"]
    ids = [1] + list(range(20, 40))
    engine.prefill(ids)
    engine.reset()
    assert engine.sequence == () and engine.generate(ids, greedy(1)).run().stats.reused_tokens == 0
    traced = engine.generate(ids, GenerationSettings(max_new_tokens=1, reuse_prefix=True, trace=tmp_path / "t.jsonl"))
    assert traced.run().stats.reused_tokens == 0  # a trace holds every position of its sequence
    engine.model.forward(torch.tensor([9, 9]))  # past the engine: what it holds is unknown now
    assert engine.sequence == () and engine.generate(ids, greedy(1)).run().stats.reused_tokens == 0
    assert engine.generate(ids, greedy(1)).run().stats.reused_tokens == len(ids) - 1


def test_truncate_and_room_are_checked(engines):
    engine, _ = engines["resident"]
    engine.prefill([1, 5, 6])
    with pytest.raises(SettingError, match="cannot keep 4 positions"):
        engine.truncate(4)
    engine.truncate(2)
    assert engine.sequence == (1, 5)
    with pytest.raises(SettingError, match="after the 2 held exceeds the context length"):
        engine.extend([7] * engine.context_length)
    assert engine.sequence == (1, 5)


# ---- the sliding window's ring -----------------------------------------------------------------


def ring_holds(written: int, n: int) -> bool:
    """Does a ring of WINDOW + CHUNK slots, after positions 0 .. written-1, still hold every key
    that position n attends to (n - WINDOW + 1 .. n - 1)?"""
    held = set(range(max(0, written - (WINDOW + CHUNK)), written))
    return set(range(max(0, n - WINDOW + 1), n)) <= held


@pytest.mark.parametrize("budget", RING_BUDGETS)
@SLOW
@given(data=st.data())
def test_a_prefix_the_ring_no_longer_holds_is_prefilled_again(engines, budget, data):
    """An earlier request long enough to wrap the ring, then a prompt sharing some prefix with
    it: the prefix is reused exactly when the ring still holds the keys the first new position
    attends to (else everything is prefilled), and the logits equal a fresh prefill's within
    fp32 rounding either way (bit for bit when nothing is reused)."""
    engine, oracle = engines[budget]
    before = [1] + data.draw(st.lists(TOKENS, min_size=30, max_size=70), label="earlier")
    replies = data.draw(st.integers(1, 12), label="reply")
    keep = data.draw(st.integers(1, len(before)), label="common prefix")
    prompt = before[:keep] + data.draw(st.lists(TOKENS, max_size=20), label="new tail")
    engine.generate(before, greedy(replies, reuse=False)).run()
    written = len(before) + replies - 1
    assert engine.model.cache.oldest == max(0, written - (WINDOW + CHUNK))
    common = min(lcp(engine.sequence, prompt), len(prompt) - 1)
    expect = common if ring_holds(written, common) else 0
    assert engine.reusable_prefix(prompt) == expect
    want = fresh(oracle, prompt)
    got = engine.prefill(prompt, reuse=True)
    if expect == 0:
        assert torch.equal(got, want)
    else:
        assert torch.allclose(got, want, atol=1e-4, rtol=0)
    assert engine.sequence == tuple(prompt)


def test_truncating_past_what_the_ring_holds_is_refused(engines):
    engine, oracle = engines["ring"]
    ids = [1] + [(13 * i) % 490 + 3 for i in range(69)]
    engine.prefill(ids)  # 70 positions written: the ring holds 38 .. 69
    engine.truncate(69)  # position 69 attends to 46 .. 68: held
    with pytest.raises(SettingError, match=r"cannot keep 40 positions: the KV cache's ring of 32 slots") as e:
        engine.truncate(40)  # position 40 attends to 17 .. 39: gone
    assert "\n" not in str(e.value) and engine.sequence == tuple(ids[:69])
    assert torch.allclose(engine.extend(ids[69:]), fresh(oracle, ids), atol=1e-4, rtol=0)  # a decode step against a chunk
