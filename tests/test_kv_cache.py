"""The KV cache on its own: 8-bit codes and scales, bytes held, a sliding window's ring, the
prefill mask, and what a decode step costs on the host.

Oracles: hand-computed bounds and byte counts, a plain dict of position -> tensor kept beside
the ring, a brute-force mask (key k visible to query q iff k <= q and q - k < window), and the
TorchDispatchMode counter of tests/test_host_work.py (ops, allocations and host reads seen one
aten call at a time).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from offload.config import ModelConfig
from offload.demo import DEMO_MODEL_DIR
from offload.engine import Engine
from offload.errors import SettingError
from offload.model import (
    KVCache,
    kv_cache_nbytes,
    kv_capacity,
    prefill_mask,
    quantize_kv,
)
from tests.model_builder import WINDOWED
from tests.test_host_work import FACTORY_OPS, HOST_READ, OPS_PER_LAYER, decode_step_ops

# An 8-bit decode step quantizes the new key and value (one cat, abs, amax, the scale and its
# floor, divide, round, clamp, cast: ~11 ops, the casts to fp32 included in a 16-bit dtype), writes
# codes and scale (2) and multiplies the read slice back (slices, one int8 x scale multiply,
# split: ~4), where 16 bits write and read views (4): measured 14 more per layer on the demo model
# (bf16: 63.4 ops per layer all resident, 68.6 through the cache at 4 slots, against 49.4, 54.6).
KV8_EXTRA_OPS_PER_LAYER = 16


@pytest.fixture(scope="module")
def windowed_config(model_dirs) -> ModelConfig:
    return ModelConfig.from_dir(model_dirs[WINDOWED.name])


# ---- 8-bit codes ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_codes_times_scale_is_within_half_a_step(dtype):
    """Each row's scale is its absmax / 127 rounded to the dtype; every value comes back within
    half a step of that scale, plus, for the row's largest values, the scale's own rounding
    (|absmax - 127 * scale|). An all-zero row gives zero codes and no NaN."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 37, 64, generator=g) * torch.logspace(-3, 3, 37)[None, :, None]  # rows of every size
    x[1, 5] = 0.0
    x = x.to(dtype)
    codes, scale = quantize_kv(x, dtype)
    assert codes.dtype == torch.int8 and scale.dtype == dtype and scale.shape == (4, 37, 1)
    assert codes.abs().max() <= 127 and torch.equal(codes[1, 5], torch.zeros(64, dtype=torch.int8))
    back = codes.float() * scale.float()
    xf, s = x.float(), scale.float()
    absmax = xf.abs().amax(-1, keepdim=True)
    bound = 0.5 * s + (absmax - 127 * s).abs() + 1e-6 * absmax  # fp32 rounding of the division
    assert torch.isfinite(back).all()
    assert ((back - xf).abs() <= bound).all()
    assert ((absmax / 127 - s).abs() <= torch.finfo(dtype).eps * absmax / 127 + torch.finfo(dtype).tiny).all()


def test_nbytes_counts_codes_scales_and_the_ring(windowed_config):
    """Bytes by hand: 2 (keys, values) x L x G x slots x (Dh values, or Dh int8 codes and one
    scale in the compute dtype), slots = every position or the window's ring (window + chunk)."""
    c = windowed_config
    L, G, Dh, W = c.num_hidden_layers, c.num_key_value_heads, c.head_dim, c.sliding_window
    assert W == 24
    for dtype, size in ((torch.float32, 4), (torch.bfloat16, 2)):
        for bits, row in ((16, Dh * size), (8, Dh + size)):
            for chunk, slots in ((None, 512), (8, W + 8), (1000, 512)):
                cache = KVCache(c, 512, torch.device("cpu"), dtype, bits, chunk)
                assert cache.capacity == kv_capacity(c, 512, chunk) == slots
                assert cache.nbytes == kv_cache_nbytes(c, 512, dtype, bits, chunk) == 2 * L * G * slots * row
    no_window = dataclasses.replace(c, sliding_window=None)
    assert KVCache(no_window, 512, torch.device("cpu"), torch.bfloat16, 8, 8).capacity == 512


def test_the_plan_counts_the_bytes_the_cache_holds(windowed_config):
    """offload.plan's KV figure (what budgets are made of) against the allocation itself, in
    bf16 (a 2-byte scale either way) with and without the ring."""
    from offload.plan import kv_cache_bytes

    c = windowed_config
    for bits in (16, 8):
        for chunk in (8, 256):
            cache = KVCache(c, 512, torch.device("cpu"), torch.bfloat16, bits, chunk)
            assert kv_cache_bytes(c, 512, torch.bfloat16, bits, chunk) == cache.nbytes
        no_window = dataclasses.replace(c, sliding_window=None)
        cache = KVCache(no_window, 512, torch.device("cpu"), torch.bfloat16, bits, 256)
        assert kv_cache_bytes(no_window, 512, torch.bfloat16, bits, 256) == cache.nbytes


# ---- the ring ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [16, 8])
def test_the_ring_gives_back_every_held_position_in_order(windowed_config, bits):
    """Chunks of several sizes written one after another, wrapping the ring many times: every
    range a pass may read (the window before it and its own) comes back in position order with
    the values written (8 bits: as quantized), and ``oldest`` is what has not been overwritten."""
    c = windowed_config
    G, Dh = c.num_key_value_heads, c.head_dim
    cache = KVCache(c, 512, torch.device("cpu"), torch.float32, bits, chunk=8)
    C = cache.capacity
    g = torch.Generator().manual_seed(1)
    held: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # position -> (key, value) [G, Dh], as stored
    start = 0
    for T in [5, 8, 3, 8, 1, 7, 8, 8, 2, 8, 8, 6] * 3:
        k, v = torch.randn(2, G, T, Dh, generator=g)
        cache.begin(start, T)
        cache.write(2, start, k, v)
        sk, sv = cache.stored(k, v)
        for i in range(T):
            held[start + i] = (sk[:, i], sv[:, i])
        end = start + T
        first = cache.first_key(start)
        keys, values = cache.read(2, first, end)  # [G, S, Dh]
        assert keys.shape == (G, end - first, Dh)
        for j, p in enumerate(range(first, end)):
            assert torch.equal(keys[:, j], held[p][0]) and torch.equal(values[:, j], held[p][1])
        start = end
        cache.length = end
        assert cache.oldest == max(0, end - C)
    assert start > 3 * C  # wrapped several times
    if bits == 16:
        assert torch.equal(sk, k)
    else:
        assert not torch.equal(sk, k) and (sk - k).abs().max() < 0.05


def test_a_decode_step_reads_exactly_the_window(windowed_config):
    """For every position up to four times round the ring: the slots [lo, hi) (with the mask
    where the window wraps) hold exactly the positions the query sees, start - W + 1 .. start."""
    c = windowed_config
    W = c.sliding_window
    cache = KVCache(c, 512, torch.device("cpu"), torch.float32, 16, chunk=8)
    C = cache.capacity
    slot_holds: dict[int, int] = {}  # slot -> position written there last
    for start in range(4 * C):
        lo, hi, mask = cache.decode_span(start)
        assert int(cache.slot) == start % C
        slot_holds[start % C] = start
        read = [s for s in range(lo, hi) if mask is None or bool(mask[0, s - lo])]
        assert sorted(slot_holds[s] for s in read) == list(range(max(0, start - W + 1), start + 1))
        assert (mask is None) == (hi - lo <= W)


def test_a_sequence_continues_only_while_the_ring_holds_its_window(windowed_config):
    c = windowed_config
    W = c.sliding_window
    cache = KVCache(c, 512, torch.device("cpu"), torch.float32, 16, chunk=8)
    C = cache.capacity  # 32
    cache.begin(0, 100)
    cache.length = 100
    assert cache.oldest == 100 - C
    for n in range(101):
        assert cache.can_continue(n) == (n - W + 1 >= 100 - C)  # n >= 91: at most chunk + 1 back
    assert not cache.can_continue(101)
    cache.reset()
    assert cache.oldest == 0 and cache.length == 0


# ---- the prefill mask ---------------------------------------------------------------------------


def brute_mask(start: int, T: int, first: int, window: int | None) -> torch.Tensor:
    rows = []
    for q in range(start, start + T):
        rows.append([k <= q and (window is None or q - k < window) for k in range(first, start + T)])
    return torch.tensor(rows)


@pytest.mark.parametrize("window", [None, 24, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_prefill_mask_is_causal_and_windowed(window, dtype):
    """Every way ``prefill_mask`` answers on a CPU (no tensor, is_causal, the additive mask) is
    the brute-force mask, for chunks from position 0 and later ones; so is the lower-right bias
    it gives CUDA for a later chunk with no window cutting in."""
    from torch.nn.attention.bias import causal_lower_right

    for start in (0, 3, 8, 40, 100):
        for T in (1, 2, 8, 30):
            first = 0 if window is None else max(0, start - window + 1)
            mask, causal = prefill_mask(start, T, first, window, torch.device("cpu"), dtype)
            want = brute_mask(start, T, first, window)
            if T == 1:
                assert mask is None and not causal and want.all()
            elif causal:
                assert mask is None and torch.equal(want, torch.ones(T, T, dtype=torch.bool).tril())
            else:
                assert mask.dtype == dtype and torch.equal(mask == 0, want) and torch.isinf(mask[~want]).all()
                if window is None:
                    assert torch.equal(causal_lower_right(T, start + T - first)._materialize(), want)
            if start == 0 and 1 < T and (window is None or T <= window):
                assert causal  # the first chunk never makes a mask


# ---- a decode step's host work ----------------------------------------------------------------


class NewTensors(TorchDispatchMode):
    """The element counts of every tensor an op returns in new storage (not a view of, or an
    in-place write to, one of its inputs)."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.sizes.append(t.numel())
        return out


def largest_new_tensor_in_a_decode_step(engine: Engine, context: int) -> int:
    ids = [engine.tokenizer.bos_id] + [(7 * i) % 3000 + 10 for i in range(context - 1)]  # [context]
    token = int(engine.prefill(ids).argmax())
    engine.decode(token)
    seen = NewTensors()
    with seen:
        engine.decode(token)
    return max(seen.sizes)


@pytest.fixture(scope="module")
def demo_kv8():
    engine = Engine.load(DEMO_MODEL_DIR, device="cpu", kv_bits=8)
    yield engine
    engine.close()


def test_an_8_bit_decode_step_stays_under_its_op_budget(demo_kv8):
    ops = decode_step_ops(demo_kv8)
    layers = demo_kv8.config.num_hidden_layers
    total = sum(ops.values())
    assert total <= (OPS_PER_LAYER + KV8_EXTRA_OPS_PER_LAYER) * layers, f"{total / layers:.1f} ops per layer"
    made = {name: n for name, n in ops.items() if name.removeprefix("aten.").startswith(FACTORY_OPS)}
    assert made == {}  # codes and scales written in place, into the buffers made at load
    assert ops[HOST_READ] == layers and ops["aten.item.default"] == 0


def test_a_decode_step_copies_nothing_of_the_context(demo_kv8):
    """16 bits: the largest tensor a decode step makes is the same at 100 and 1500 positions
    held (keys and values are read as views). 8 bits: it is the slice multiplied back, 2 G x S x
    Dh, linear in S; nothing bigger."""
    c = demo_kv8.config
    plain = Engine.load(DEMO_MODEL_DIR, device="cpu")
    try:
        small, large = (largest_new_tensor_in_a_decode_step(plain, n) for n in (100, 1500))
        assert small == large < 1500 * c.head_dim
    finally:
        plain.close()
    for n in (100, 1500):
        S = n + 2  # the prompt, a first decode step, and the counted step's own position
        largest = largest_new_tensor_in_a_decode_step(demo_kv8, n)
        assert largest == max(2 * c.num_key_value_heads * S * c.head_dim, small)


# ---- the engine's settings ----------------------------------------------------------------------


def test_kv_bits_and_batch_size_are_checked_and_kept(model_dirs):
    path = model_dirs[WINDOWED.name]
    for bad in (4, 12, True, "8"):
        with pytest.raises(SettingError, match="--kv-bits") as e:
            Engine.load(path, device="cpu", kv_bits=bad)
        assert "\n" not in str(e.value)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(SettingError, match="--batch-size") as e:
            Engine.load(path, device="cpu", batch_size=bad)
        assert "\n" not in str(e.value)
    engine = Engine.load(path, device="cpu", dtype="float32", kv_bits=8, batch_size=8)
    assert (engine.kv_bits, engine.prefill_chunk) == (8, 8)
    assert engine.model.cache.capacity == WINDOWED.config_kwargs()["sliding_window"] + 8
    default = Engine.load(path, device="cpu", dtype="float32")
    assert (default.kv_bits, default.prefill_chunk, default.model.cache.bits) == (16, 256, 16)


def test_under_a_budget_the_chunk_is_the_plans_unless_given(model_dirs):
    path = model_dirs[WINDOWED.name]
    planned = Engine.load(path, device="cpu", dtype="float32", experts_per_layer=2)
    assert planned.prefill_chunk == getattr(planned.plan, "prefill_chunk", 256)
    given = Engine.load(path, device="cpu", dtype="float32", experts_per_layer=2, batch_size=16, kv_bits=8)
    assert given.prefill_chunk == 16 and given.kv_bits == 8
    assert getattr(given.plan, "prefill_chunk", 16) == 16


def test_the_context_check_counts_the_ring_and_the_8_bit_codes(windowed_config, monkeypatch):
    """On a device with N bytes free the longest context is the one whose KV cache (a ring of
    window + chunk positions, or every position; 16-bit or codes and scales) plus its rotary
    tables (2 x Dh per position) fit, by hand."""
    import offload.device
    from offload.engine import check_context_memory
    from offload.errors import BudgetError

    c = windowed_config
    L, G, Dh, W = c.num_hidden_layers, c.num_key_value_heads, c.head_dim, c.sliding_window
    tables = 2 * Dh * 2  # bf16 cos and sin per position
    for config, bits, chunk in ((c, 16, 8), (c, 8, 8), (dataclasses.replace(c, sliding_window=None), 8, 8)):
        row = Dh * 2 if bits == 16 else Dh + 2
        slots = W + chunk if config.sliding_window else None
        fits = 1000
        free = 2 * L * G * (fits if slots is None else min(fits, slots)) * row + tables * fits + 3
        monkeypatch.setattr(offload.device, "memory_info", lambda device, free=free: (free, 10**12))
        check_context_memory(config, fits, torch.device("cpu"), torch.bfloat16, bits, chunk)
        with pytest.raises(BudgetError, match=rf"at most {fits} positions fit \(--context {fits}\)") as e:
            check_context_memory(config, fits + 1, torch.device("cpu"), torch.bfloat16, bits, chunk)
        if slots is not None:
            assert f"a ring of {slots} positions for the {W}-token window" in str(e.value)
        if bits == 8:
            assert "8-bit" in str(e.value)
