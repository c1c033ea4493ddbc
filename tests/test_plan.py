"""The memory plan's runtime reserve, pinned RAM tier, uneven slots and load-time clamp, each
checked against hand arithmetic or an independent replay of the shared traces."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from offload.config import ModelConfig
from offload.errors import BudgetError
from offload.experts.record import RecordLayout
from offload.plan import (
    PREFILL_CHUNK_TOKENS,
    BUILTIN_MODELS,
    MemoryPlan,
    builtin_model,
    dense_bytes_by_class,
    fit_to_free,
    pinned_chunks,
    plan_memory,
    runtime_reserve,
    spread_slots,
)
from offload.trace import MIXTRAL_DECODE

GiB, MiB = 2**30, 2**20
NF4_EXPERT = 99_090_624  # FACTS.md: one Mixtral-8x7B expert in nf4
BF16_DENSE = 3_211_272_192  # tests/test_info.py's hand sum for Mixtral-8x7B in bf16
KV_4096 = 2 * 32 * 8 * 4096 * 128 * 2
needs_traces = pytest.mark.skipif(not MIXTRAL_DECODE.is_file(), reason="the shared Mixtral traces are not here")


def mixtral() -> ModelConfig:
    return builtin_model("mixtral-8x7b")[1]


def power_of_two_at_least(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


# ---- the runtime reserve -------------------------------------------------------------------


def mixtral_reserve_by_hand(context: int, tokens: int, quantized: bool) -> dict[str, int]:
    """Each term of the documented formula for Mixtral-8x7B (H 32, G 8, Dh 128, D 4096, I 14336,
    V 32000), bf16 compute (2 bytes), written out."""
    H, G, Dh, D, I, V, s = 32, 8, 128, 4096, 14336, 32000, 2
    T, S = tokens, context
    return {
        "CUDA context": 512 * MiB,
        "cuBLAS workspaces": 64 * MiB,
        "dequantized weight": 14336 * 4096 * 2 if quantized else 0,  # 112 MiB
        "attention": 2 * H * T * S * 4 + 2 * H * S * Dh * s + 4 * (H * T * Dh + 2 * H * S * Dh)
        + T * (3 * H * Dh + 4 * G * Dh) * s,
        "expert activations": T * (3 * I * s + D * s + D * 4),
        "hidden states": T * D * (5 * s + 8),
        "logits": V * (s + 24),
        "allocator margin": 64 * MiB,
    }


@pytest.mark.parametrize("context, quantized", [(4096, True), (1024, False)])
def test_reserve_terms_by_hand(context, quantized):
    fmt = "nf4" if quantized else "bf16"
    reserve = runtime_reserve(mixtral(), torch.bfloat16, fmt, "bf16", "cuda", context=context)
    want = mixtral_reserve_by_hand(context, PREFILL_CHUNK_TOKENS, quantized)
    assert {t.name: t.nbytes for t in reserve.terms} == want
    assert reserve.total == sum(want.values())
    assert reserve.working == reserve.total - 512 * MiB  # the context is already gone at load
    assert all(t.reason for t in reserve.terms)
    if quantized:
        assert want["dequantized weight"] == 112 * MiB


def test_reserve_is_nothing_on_a_cpu_and_bounded_by_the_window():
    assert runtime_reserve(mixtral(), torch.bfloat16, "nf4", "nf4", "cpu", context=4096).total == 0
    raw = dict(BUILTIN_MODELS["mixtral-8x7b"][1], sliding_window=1000)
    windowed = ModelConfig.from_dict(raw, source="test")
    attention = {t.name: t.nbytes for t in runtime_reserve(windowed, torch.bfloat16, "nf4", "bf16", "cuda",
                                                           context=4096).terms}["attention"]
    # keys seen by a chunk of 256: the window plus the chunk, 1000 + 256 - 1 = 1255, not 4096
    assert attention == mixtral_reserve_by_hand(1255, 256, True)["attention"]


def test_the_reserve_is_inside_the_device_budget_on_cuda_only():
    c = mixtral()
    cuda = plan_memory(c, NF4_EXPERT, torch.bfloat16, 4096, experts_per_layer=2, device_type="cuda",
                       expert_format="nf4", attn_format="bf16")
    cpu = plan_memory(c, NF4_EXPERT, torch.bfloat16, 4096, experts_per_layer=2)
    reserve = sum(mixtral_reserve_by_hand(4096, 256, True).values())
    assert cuda.device_bytes == BF16_DENSE + KV_4096 + 64 * NF4_EXPERT + reserve
    assert cpu.device_bytes == BF16_DENSE + KV_4096 + 64 * NF4_EXPERT
    # formats left out are inferred from the bytes: an nf4 record is below bf16's, dense is bf16
    inferred = plan_memory(c, NF4_EXPERT, torch.bfloat16, 4096, experts_per_layer=2, device_type="cuda")
    assert inferred.reserve == cuda.reserve
    minimum = BF16_DENSE + KV_4096 + 64 * NF4_EXPERT + reserve
    with pytest.raises(BudgetError, match="runtime reserve") as info:
        plan_memory(c, NF4_EXPERT, torch.bfloat16, 4096, vram=minimum - 1, device_type="cuda")
    assert "\n" not in str(info.value)
    assert plan_memory(c, NF4_EXPERT, torch.bfloat16, 4096, vram=minimum, device_type="cuda").slots_per_layer == 2


# ---- pinned blocks ---------------------------------------------------------------------------


def check_chunks(rows: int, row_bytes: int):
    chunks = pinned_chunks(rows, row_bytes)
    assert sum(chunks.rows) == rows and all(r >= 1 for r in chunks.rows)
    pinned = sum(power_of_two_at_least(r * row_bytes) for r in chunks.rows)
    assert chunks.pinned_bytes == pinned
    return pinned


@settings(max_examples=200, deadline=None)
@given(rows=st.integers(1, 600), row_bytes=st.integers(4096, 2**31))
def test_pinned_blocks_waste_less_than_one_record_per_halving(rows, row_bytes):
    pinned = check_chunks(rows, row_bytes)
    assert rows * row_bytes <= pinned < (rows + math.floor(math.log2(rows)) + 1) * row_bytes


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(128, 2048), row_bytes=st.integers(64 * 1024, GiB))
def test_pinned_blocks_within_5_percent_from_128_records(rows, row_bytes):
    assert check_chunks(rows, row_bytes) <= 1.05 * rows * row_bytes


@pytest.mark.parametrize("model", ["demo", "mixtral-8x7b", "mixtral-8x22b"])
@pytest.mark.parametrize("fmt", ["bf16", "int8", "nf4", "nf4-dq", "fp32"])
def test_pinned_blocks_within_5_percent_for_every_expert_of_real_models(model, fmt):
    if model == "demo":
        from offload.demo import DEMO_MODEL_DIR

        config = ModelConfig.from_dir(DEMO_MODEL_DIR)
    else:
        config = builtin_model(model)[1]
    rows = config.num_hidden_layers * config.num_local_experts
    row_bytes = RecordLayout.for_config(config, fmt).nbytes
    assert check_chunks(rows, row_bytes) <= 1.05 * rows * row_bytes


def test_mixtral_nf4_pins_24_gib_not_32():
    raw = 256 * NF4_EXPERT  # 23.63 GiB: one block would round to 32 GiB
    assert power_of_two_at_least(raw) == 32 * GiB
    chunks = pinned_chunks(256, NF4_EXPERT)
    assert chunks.pinned_bytes == 24 * GiB == check_chunks(256, NF4_EXPERT)
    # a RAM tier of exactly 24 GiB on CUDA holds every record; a byte less does not
    c = mixtral()
    full = plan_memory(c, NF4_EXPERT, torch.bfloat16, 4096, experts_per_layer=2, ram=24 * GiB, device_type="cuda")
    assert full.host_experts == 256 and full.host_bytes == 24 * GiB and full.host_pinned and not full.disk_tier
    short = plan_memory(c, NF4_EXPERT, torch.bfloat16, 4096, experts_per_layer=2, ram=24 * GiB - 1, device_type="cuda")
    assert short.host_experts < 256 and short.host_bytes <= 24 * GiB - 1
    # the same budget on a CPU counts raw bytes, one unpinned buffer
    cpu = plan_memory(c, NF4_EXPERT, torch.bfloat16, 4096, experts_per_layer=2, ram=24 * GiB - 1)
    assert cpu.host_experts == 256 and cpu.host_bytes == raw and cpu.host_chunks == ()


def test_a_partial_pinned_tier_fills_its_blocks():
    """8 GiB of RAM: one 8 GiB block holds floor(8 GiB / record) = 86 records, all of the budget."""
    plan = plan_memory(mixtral(), NF4_EXPERT, torch.bfloat16, 4096, experts_per_layer=2, ram=8 * GiB,
                       device_type="cuda")
    assert plan.host_experts == 8 * GiB // NF4_EXPERT == 86
    assert plan.host_chunks == (86,) and plan.host_bytes == 8 * GiB and plan.disk_tier


# ---- uneven slots ----------------------------------------------------------------------------


def test_spread_slots_by_gains_and_evenly():
    gains = [0.1, 0.3, 0.2, 0.3, 0.0, 0.25]
    assert spread_slots(6 * 2 + 3, 6, 8, 2, gains) == (2, 3, 2, 3, 2, 3)  # 0.3, 0.3 (lower layer first), 0.25
    assert spread_slots(6 * 3, 6, 8, 2, gains) == (3,) * 6
    assert spread_slots(8 * 2 + 2, 8, 8, 2) == (2, 2, 3, 2, 2, 2, 3, 2)  # middles of two runs of 4: layers 2, 6
    assert spread_slots(8 * 2 + 1, 8, 8, 2) == (2, 2, 2, 2, 3, 2, 2, 2)
    with pytest.raises(BudgetError):
        spread_slots(8 * 2 - 1, 8, 8, 2)


@needs_traces
def test_12_gib_gives_the_spare_slots_to_the_layers_lru_gains_most():
    from offload.trace import load_trace, simulate

    c = mixtral()
    attention = dense_bytes_by_class(c, torch.bfloat16)
    dense = sum(attention.values())
    reserve = sum(mixtral_reserve_by_hand(4096, 256, True).values())
    total = (12 * GiB - dense - KV_4096 - reserve) // NF4_EXPERT  # by hand: 78 slots
    plan = plan_memory(c, NF4_EXPERT, torch.bfloat16, 4096, vram=12 * GiB, device_type="cuda", expert_format="nf4",
                       attn_format="bf16")
    assert total == 78 and plan.device_slots == total and plan.slots_per_layer == 2
    assert plan.device_expert_bytes == total * NF4_EXPERT and plan.spread == "trace"
    trace = load_trace(MIXTRAL_DECODE)
    two, three = simulate(trace, 2, "lru").layer_hit_rates(), simulate(trace, 3, "lru").layer_hit_rates()
    gain = [b - a for a, b in zip(two, three)]
    best = sorted(range(32), key=lambda layer: (-gain[layer], layer))[: total - 64]
    assert [layer for layer, s in enumerate(plan.layer_slots) if s == 3] == sorted(best)
    assert "2-3/8 experts per layer on the device (2.44 on average)" in plan.describe()
    out = plan.to_dict()
    assert out["layer_slots"] == list(plan.layer_slots) and out["device_slots"] == 78
    # asked for evenly, the same 14 spare slots sit in the middles of 14 runs of layers
    even = plan_memory(c, NF4_EXPERT, torch.bfloat16, 4096, vram=12 * GiB, device_type="cuda", spread="even")
    assert even.layer_slots == spread_slots(78, 32, 8, 2) and even.spread == "even"


def test_experts_per_layer_stays_even_and_other_shapes_spread_evenly():
    c = mixtral()
    plan = plan_memory(c, NF4_EXPERT, torch.bfloat16, 4096, experts_per_layer=3, device_type="cuda")
    assert plan.layer_slots == (3,) * 32 and plan.slots_text() == "3/8"
    big = builtin_model("mixtral-8x22b")[1]  # 56 layers: not the traces' shape
    record = RecordLayout.for_config(big, "nf4").nbytes
    fixed = plan_memory(big, record, torch.bfloat16, 4096, experts_per_layer=2, device_type="cuda")
    vram = fixed.device_bytes + 5 * record  # 5 slots over the minimum
    plan = plan_memory(big, record, torch.bfloat16, 4096, vram=vram, device_type="cuda")
    assert plan.spread == "even" and plan.layer_slots == spread_slots(56 * 2 + 5, 56, 8, 2)
    assert plan.device_bytes == vram


def test_memory_plan_keeps_its_old_constructor():
    plan = MemoryPlan(100, 10, 7, 16, 2, 4, 2)
    assert plan.layer_slots == (2, 2) and plan.device_expert_bytes == 4 * 7 and plan.device_bytes == 110 + 28
    assert plan.host_bytes == 28 and plan.reserve.total == 0
    with pytest.raises(ValueError):
        MemoryPlan(100, 10, 7, 16, 2, 4, 2, layer_slots=(3, 3))  # the smallest must be slots_per_layer


# ---- the load-time clamp ---------------------------------------------------------------------


def cuda_plan(**budget) -> MemoryPlan:
    return plan_memory(mixtral(), NF4_EXPERT, torch.bfloat16, 4096, device_type="cuda", expert_format="nf4",
                       attn_format="bf16", **budget)


def test_fit_to_free_leaves_a_fitting_plan_alone():
    plan = cuda_plan(vram=12 * GiB)
    free = plan.device_expert_bytes + plan.reserve.working  # exactly enough
    assert fit_to_free(plan, free) == (plan, None)


def test_fit_to_free_clamps_to_what_is_free():
    plan = cuda_plan(vram=12 * GiB)  # 78 slots
    working = plan.reserve.working
    free = working + 70 * NF4_EXPERT + NF4_EXPERT // 2  # 70.5 slots' worth after the reserve
    fitted, note = fit_to_free(plan, free)
    assert fitted.device_slots == 70 and fitted.slots_per_layer == 2 and len(fitted.layer_slots) == 32
    assert fitted.host_experts == plan.host_experts and fitted.host_chunks == plan.host_chunks
    assert note is not None and "\n" not in note
    assert "70 expert slots" in note and "78" in note and "2-3/8" in note


def test_fit_to_free_refuses_below_top_k():
    plan = cuda_plan(experts_per_layer=3)
    free = plan.reserve.working + 64 * NF4_EXPERT - 1  # one byte short of 2 per layer
    with pytest.raises(BudgetError, match="63 expert slots.*needs 64") as info:
        fit_to_free(plan, free)
    assert "\n" not in str(info.value)
    fitted, note = fit_to_free(plan, free + 1)
    assert fitted.layer_slots == (2,) * 32 and note


def test_fit_to_free_sizes_a_ram_tier_for_a_plan_that_had_none():
    plan = cuda_plan(experts_per_layer=8, ram=24 * GiB)
    assert plan.host_experts == 0
    fitted, _ = fit_to_free(plan, plan.reserve.working + 200 * NF4_EXPERT)
    assert fitted.device_slots == 200 and fitted.host_experts == 256 and fitted.host_bytes == 24 * GiB


def test_quantizing_checkpoint_records_on_the_device_is_reserved():
    """When the cache reads a checkpoint and quantizes each record on the GPU, one matrix's copy,
    fp32 temporary and codes are reserved (bf16: 7 bytes a weight); not for a pack or plain experts."""
    from offload.plan import builtin_model, runtime_reserve

    _, c = builtin_model("mixtral-8x7b")
    plain = runtime_reserve(c, torch.bfloat16, "nf4", "bf16", "cuda", context=4096)
    reading = runtime_reserve(c, torch.bfloat16, "nf4", "bf16", "cuda", context=4096, quantize_experts=True)
    assert reading.total - plain.total == 14336 * 4096 * (2 + 4 + 1)
    unquantized = runtime_reserve(c, torch.bfloat16, "bf16", "bf16", "cuda", context=4096, quantize_experts=True)
    assert unquantized.total == runtime_reserve(c, torch.bfloat16, "bf16", "bf16", "cuda", context=4096).total


# ---- sizes as people write them, and the article before a size ------------------------------


@pytest.mark.parametrize("text, want", [
    ("24G", 24 * GiB), ("24GiB", 24 * GiB), ("24Gi", 24 * GiB), ("24gib", 24 * GiB), (" 24 GiB ", 24 * GiB),
    ("24GB", 24 * 10**9), ("24gb", 24 * 10**9), ("1.5G", 3 * GiB // 2),
    ("512K", 512 * 2**10), ("512KiB", 512 * 2**10), ("512KB", 512_000), ("16M", 16 * MiB), ("16MB", 16 * 10**6),
    ("2T", 2 * 2**40), ("2TiB", 2 * 2**40), ("2TB", 2 * 10**12), ("512B", 512), ("0", 0), ("0.0", 0), (4096, 4096),
])
def test_parse_bytes_reads_sizes_as_people_write_them(text, want):
    from offload.plan import parse_bytes

    assert parse_bytes(text, "--vram") == want


@pytest.mark.parametrize("text, words", [
    ("12", ("--vram 12: a size needs a unit: 12GiB (2^30 bytes), 12GB (10^9 bytes) or 12B",)),
    ("1.5", ("--vram 1.5: a size needs a unit: 1.5GiB",)),
    ("lots", ("--vram 'lots'", "expected a size")),
    ("12X", ("unknown unit 'X'",)),
    ("-1GiB", ("expected a size",)),
    ("9" * 400 + "GiB", ("too large a size",)),
])
def test_parse_bytes_refuses_in_one_line_naming_the_setting(text, words):
    from offload.errors import SettingError
    from offload.plan import parse_bytes

    with pytest.raises(SettingError) as e:
        parse_bytes(text, "--vram")
    message = str(e.value)
    assert "\n" not in message and len(message) < 200 and message.startswith("--vram ")
    assert all(w in message for w in words), message


def test_is_decimal_size():
    from offload.plan import is_decimal_size

    assert is_decimal_size("24GB") and is_decimal_size("512 mb")
    assert not any(is_decimal_size(t) for t in ("24GiB", "24G", "24Gi", "512B", "0", "lots", 5))


@pytest.mark.parametrize("size, want", [
    ("8 GiB", "An"), ("8.50 GiB", "An"), ("80 GiB", "An"), ("800 MiB", "An"), ("11 GiB", "An"), ("18 GiB", "An"),
    ("11.5 GiB", "An"), ("11000", "An"), ("18,000", "An"),
    ("1 GiB", "A"), ("12 GiB", "A"), ("24 GiB", "A"), ("110 GiB", "A"), ("180 GiB", "A"), ("1.8 GiB", "A"),
])
def test_article_before_a_size(size, want):
    from offload.plan import article

    assert article(size) == want
