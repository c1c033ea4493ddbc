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
    device_dense_bytes,
    embeddings_on_host,
    fit_to_free,
    pinned_chunks,
    plan_memory,
    plan_model,
    runtime_reserve,
    spread_slots,
)
from offload.trace import MIXTRAL_DECODE

GiB, MiB = 2**30, 2**20
NF4_EXPERT = 99_090_624  # FACTS.md: one Mixtral-8x7B expert in nf4
BF16_DENSE = 3_211_272_192  # tests/test_info.py's hand sum for Mixtral-8x7B in bf16
CARD_DENSE = BF16_DENSE - 32000 * 4096 * 2  # on a card: less the input embeddings, kept in RAM
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


def mixtral_reserve_by_hand(context: int, tokens: int, quantized: bool, sdpa: str = "fused",
                            kv_bits: int = 16, window: int | None = None) -> dict[str, int]:
    """Each term of the documented formula for Mixtral-8x7B (H 32, G 8, Dh 128, D 4096, I 14336,
    V 32000), bf16 compute (2 bytes), written out; ``quantized``: 4-bit experts or attention (a
    dequantized slice of at most 32 MiB). Attention over a chunk of T queries and S keys
    (the context; with a sliding window W, W + T - 1 at most): the projections; with 8-bit KV the
    chunk's keys and values quantized (cat, fp32 copy, its abs, fp32 quotient, codes: s + 9 bytes
    a value) and the S keys and values scaled back (one bf16 [2G, S, Dh] copy: CUDA casts the
    int8 codes as it reads them); with a ring of W + T slots shorter than the context, the two
    runs of a wrapped ring joined (one copy more, at either width);
    where the window cuts in (context > W) a [T, S] bool mask, and with grouped KV heads the math
    path; SDPA's own: the fused kernel's output and fp32 log-sum-exp, or the math path's two
    fp32 score tensors, head-expanded k/v, fp32 copies of q, k, v and the mask as fp32."""
    H, G, Dh, D, I, V, s = 32, 8, 128, 4096, 14336, 32000, 2
    T = tokens
    S = context if window is None else min(context, window + T - 1)
    masked = window is not None and context > window
    ring = window is not None and window + T < context
    projections = T * (3 * H * Dh + 4 * G * Dh) * s
    writes = 2 * G * T * Dh * (s + 9) if kv_bits == 8 else 0
    reads = ((kv_bits == 8) + ring) * (2 * G * S * Dh * s)  # [2G, S, Dh] bf16: scaled back, then joined
    mask = T * S if masked else 0
    if sdpa == "fused" and not masked:
        kernel = H * T * Dh * s + H * T * 4
    else:  # the math path: scores, softmax, expanded k and v, fp32 q, k, v, the mask in fp32 (and bool)
        kernel = 2 * H * T * S * 4 + 2 * H * S * Dh * s + 4 * (H * T * Dh + 2 * H * S * Dh) + T * S * (4 if masked else 5)
    return {
        "CUDA context": 512 * MiB,
        "cuBLAS workspaces": 64 * MiB,
        # 4-bit weights in a prompt chunk's matmul are dequantized a slice of whole rows at a time, at
        # most 32 MiB in bf16: 4096 of w1's [14336, 4096] rows of 8 KiB (w2's 28 KiB rows: 1168 in
        # steps of whole blocks, a little less; attention's [4096, 4096] whole, the same 32 MiB)
        "dequantized weight": 4096 * 4096 * s if quantized else 0,  # 32 MiB
        "attention": projections + writes + reads + mask + kernel,
        "expert activations": T * (3 * I * s + D * s + D * 4),
        "hidden states": T * D * (5 * s + 8),
        "logits": V * (s + 24),
        "allocator margin": 64 * MiB,
    }


@pytest.mark.parametrize("context, quantized, sdpa, kv_bits", [
    (4096, True, "fused", 16), (1024, False, "fused", 16), (32768, True, "fused", 8), (4096, True, "math", 16),
])
def test_reserve_terms_by_hand(context, quantized, sdpa, kv_bits):
    fmt = "nf4" if quantized else "bf16"
    reserve = runtime_reserve(mixtral(), torch.bfloat16, fmt, "bf16", "cuda", context=context, sdpa=sdpa,
                              kv_bits=kv_bits)
    want = mixtral_reserve_by_hand(context, PREFILL_CHUNK_TOKENS, quantized, sdpa, kv_bits)
    assert {t.name: t.nbytes for t in reserve.terms} == want
    assert reserve.total == sum(want.values())
    assert reserve.working == reserve.total - 512 * MiB  # the context is already gone at load
    assert all(t.reason for t in reserve.terms)
    if quantized:
        assert want["dequantized weight"] == 32 * MiB


def test_fused_attention_needs_no_score_matrix():
    """A chunk of 256 against 32768 keys: the math path's fp32 scores and softmax alone are
    2 x 32 x 256 x 32768 x 4 bytes = 2 GiB; the fused kernel's whole attention term (projections,
    the output, the log-sum-exp) is 10 MiB and change; an 8-bit KV cache adds its chunk quantized
    (2 x 8 x 256 x 128 x 11 bytes = 5.5 MiB) and its keys and values scaled back into one bf16
    tensor, 2 x 8 x 32768 x 128 x 2 bytes = 128 MiB (was two, 256 MiB, before the cast was fused)."""
    fused = mixtral_reserve_by_hand(32768, 256, True)["attention"]
    math_path = mixtral_reserve_by_hand(32768, 256, True, "math")["attention"]
    assert math_path - fused > 2 * GiB
    assert fused == 8 * MiB + 2 * MiB + 32 * 1024  # projections, output, log-sum-exp
    assert mixtral_reserve_by_hand(32768, 256, True, kv_bits=8)["attention"] - fused == 128 * MiB + 5.5 * MiB
    assert sum(mixtral_reserve_by_hand(32768, 256, True).values()) < 810 * MiB  # 4.29 GiB with the math path


def test_reserve_is_nothing_on_a_cpu_and_bounded_by_the_window():
    assert runtime_reserve(mixtral(), torch.bfloat16, "nf4", "nf4", "cpu", context=4096).total == 0
    raw = dict(BUILTIN_MODELS["mixtral-8x7b"][1], sliding_window=1000)
    windowed = ModelConfig.from_dict(raw, source="test")
    for sdpa in ("fused", "math"):
        for bits in (16, 8):
            attention = {t.name: t.nbytes for t in runtime_reserve(windowed, torch.bfloat16, "nf4", "bf16", "cuda",
                                                                   context=4096, sdpa=sdpa, kv_bits=bits).terms}
            # keys seen by a chunk of 256: the window plus the chunk, 1000 + 256 - 1 = 1255, not 4096;
            # the window cuts in, so a [T, S] mask, and with 8 grouped KV heads the math path
            want = mixtral_reserve_by_hand(4096, 256, True, sdpa, bits, window=1000)["attention"]
            assert attention["attention"] == want
            assert want > 2 * 32 * 256 * 1255 * 4  # the scores and softmax of the math path, over 1255 keys
    inside = ModelConfig.from_dict(dict(raw, sliding_window=8192), source="test")  # the window never cuts in
    assert {t.name: t.nbytes for t in runtime_reserve(inside, torch.bfloat16, "nf4", "bf16", "cuda",
                                                      context=4096).terms}["attention"] == \
        mixtral_reserve_by_hand(4096, 256, True)["attention"]


def test_the_reserve_is_inside_the_device_budget_on_cuda_only():
    c = mixtral()
    cuda = plan_memory(c, NF4_EXPERT, torch.bfloat16, 4096, experts_per_layer=2, device_type="cuda",
                       expert_format="nf4", attn_format="bf16")
    cpu = plan_memory(c, NF4_EXPERT, torch.bfloat16, 4096, experts_per_layer=2)
    reserve = sum(mixtral_reserve_by_hand(4096, 256, True).values())
    assert cuda.device_bytes == CARD_DENSE + KV_4096 + 64 * NF4_EXPERT + reserve
    assert cpu.device_bytes == BF16_DENSE + KV_4096 + 64 * NF4_EXPERT
    # formats left out are inferred from the bytes: a record below bf16's is 4-bit (the format of
    # --expert-bits 4, nf4-dq, whose dequantized slice is nf4's 32 MiB), dense at its bf16 size is bf16
    inferred = plan_memory(c, NF4_EXPERT, torch.bfloat16, 4096, experts_per_layer=2, device_type="cuda")
    assert [(t.name, t.nbytes) for t in inferred.reserve.terms] == [(t.name, t.nbytes) for t in cuda.reserve.terms]
    assert inferred.reserve.total == reserve
    (dequantized,) = [t.reason for t in inferred.reserve.terms if t.name == "dequantized weight"]
    assert "on nf4-dq experts / bf16 attention" in dequantized
    minimum = CARD_DENSE + KV_4096 + 64 * NF4_EXPERT + reserve
    at_minimum = plan_memory(c, NF4_EXPERT, torch.bfloat16, 4096, vram=minimum, device_type="cuda")
    assert at_minimum.slots_per_layer == 2 and at_minimum.prefill_chunk == 256
    with pytest.raises(BudgetError, match="runtime reserve") as info:  # a chunk of 256 given: exactly that
        plan_memory(c, NF4_EXPERT, torch.bfloat16, 4096, vram=minimum - 1, device_type="cuda", prefill_tokens=256)
    assert "\n" not in str(info.value)


def test_a_card_too_small_for_the_reserve_of_256_prefills_in_smaller_chunks():
    """A byte below the minimum at the default chunk: the plan halves the chunk (128 tokens), its
    reserve by hand; below the minimum at the smallest chunk (16), the refusal names that chunk."""
    c = mixtral()
    fixed = CARD_DENSE + KV_4096 + 64 * NF4_EXPERT
    minimum = fixed + sum(mixtral_reserve_by_hand(4096, 256, True).values())
    plan = plan_memory(c, NF4_EXPERT, torch.bfloat16, 4096, vram=minimum - 1, device_type="cuda")
    assert plan.prefill_chunk == 128 and plan.reserve.prefill_tokens == 128 and plan.slots_per_layer == 2
    assert plan.device_bytes == fixed + sum(mixtral_reserve_by_hand(4096, 128, True).values())
    smallest = fixed + sum(mixtral_reserve_by_hand(4096, 16, True).values())
    assert plan_memory(c, NF4_EXPERT, torch.bfloat16, 4096, vram=smallest, device_type="cuda").prefill_chunk == 16
    with pytest.raises(BudgetError, match=r"runtime reserve .* \(prefill chunks of 16 tokens\)$") as info:
        plan_memory(c, NF4_EXPERT, torch.bfloat16, 4096, vram=smallest - 1, device_type="cuda")
    assert "\n" not in str(info.value)
    # a budget of slots, no card: the default chunk, whatever it costs
    assert cuda_plan(experts_per_layer=2).prefill_chunk == PREFILL_CHUNK_TOKENS
    assert plan_memory(c, NF4_EXPERT, torch.bfloat16, 4096, experts_per_layer=2).prefill_chunk == 256  # a CPU


# ---- the input embeddings on a card stay in host RAM ---------------------------------------------


def tied_mixtral() -> ModelConfig:
    """Mixtral-8x7B's shape with lm_head tied to the embeddings (one [V, D] table for both)."""
    return ModelConfig.from_dict(dict(BUILTIN_MODELS["mixtral-8x7b"][1], tie_word_embeddings=True), source="test")


def test_embeddings_stay_on_the_host_only_on_a_card_with_an_untied_lm_head():
    untied, tied = mixtral(), tied_mixtral()
    assert not untied.tie_word_embeddings and tied.tie_word_embeddings
    table = {
        (device, name): embeddings_on_host(config, device)
        for device in ("cuda", torch.device("cuda"), torch.device("cuda", 0), "cpu", torch.device("cpu"))
        for name, config in (("untied", untied), ("tied", tied))
    }
    for (device, name), on_host in table.items():
        on_a_card = (device.type if isinstance(device, torch.device) else device) == "cuda"
        # a card, untied: the table is only looked up, so it stays in RAM; tied, it is lm_head, which
        # runs on the card; a CPU's memory is host RAM anyway (nothing moves)
        assert on_host is (on_a_card and name == "untied"), (device, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_device_dense_bytes_leave_out_the_embedding_table_on_a_card(dtype):
    """Untied on CUDA: every dense weight less the V x D table (Mixtral: 32000 x 4096 x 2 bytes =
    250 MiB in bf16); on a CPU, or tied, all of them. The totals are hand sums (BF16_DENSE)."""
    itemsize, plain = (2, "bf16") if dtype == torch.bfloat16 else (4, "fp32")
    untied, tied = mixtral(), tied_mixtral()
    total = BF16_DENSE // 2 * itemsize
    table = 32000 * 4096 * itemsize
    assert table == (250 * MiB if itemsize == 2 else 500 * MiB)
    by = dense_bytes_by_class(untied, dtype)
    assert by["embeddings"] == table and sum(by.values()) == total
    assert device_dense_bytes(untied, by, "cuda") == total - table
    assert device_dense_bytes(untied, by, "cpu") == total
    by_tied = dense_bytes_by_class(tied, dtype)
    assert sum(by_tied.values()) == total - table  # no lm_head of its own
    assert device_dense_bytes(tied, by_tied, "cuda") == total - table  # the one table stays on the card
    # the model's plan: ModelPlan.dense_bytes every dense weight, the device's and the host's apart;
    # the memory plan (what the card holds) counts the device's
    card = plan_model("m", untied, dtype, 4096, "nf4-dq", plain, experts_per_layer=2)
    assert card.dense_bytes == total and card.device_dense_bytes == total - table
    assert card.host_dense_bytes == table and card.memory.dense_bytes == total - table
    cpu = plan_model("m", untied, dtype, 4096, "nf4-dq", plain, experts_per_layer=2, device_type="cpu")
    assert cpu.device_dense_bytes == cpu.memory.dense_bytes == total and cpu.host_dense_bytes == 0
    tied_card = plan_model("m", tied, dtype, 4096, "nf4-dq", plain, experts_per_layer=2)
    assert tied_card.device_dense_bytes == tied_card.memory.dense_bytes == total - table
    assert tied_card.host_dense_bytes == 0
    # the card's plan is exactly the table smaller than one that counted every dense weight on it
    assert card.memory.device_bytes == plan_memory(
        untied, card.expert_bytes, dtype, 4096, experts_per_layer=2, dense=total, device_type="cuda",
        expert_format="nf4-dq", attn_format=plain).device_bytes - table


def test_info_json_says_where_the_embeddings_are(model_dirs):
    from tests.test_info import info_json
    from tests.model_builder import WIDE

    card = info_json("mixtral-8x7b", "--vram", "12GiB", "--expert-bits", "4")
    assert card["device_type"] == "cuda" and card["embeddings_on_host"] is True
    assert card["device_dense_bytes"] == card["dense_bytes"] - 32000 * 4096 * 2 == BF16_DENSE - 250 * MiB
    assert card["dense_bytes"] == BF16_DENSE == sum(card["dense_bytes_by_class"].values())
    cpu = info_json("mixtral-8x7b", "--profile", "cpu-only")
    assert cpu["device_type"] == "cpu" and cpu["embeddings_on_host"] is False
    assert cpu["device_dense_bytes"] == cpu["dense_bytes"]
    tied = info_json(str(model_dirs[WIDE.name]), "--vram", "1GiB")  # a tiny checkpoint with a tied lm_head
    assert tied["config"]["tie_word_embeddings"] and tied["device_type"] == "cuda"
    assert tied["embeddings_on_host"] is False and tied["device_dense_bytes"] == tied["dense_bytes"]


def test_info_shows_the_embeddings_in_ram_on_a_card():
    from tests.test_info import run

    result = run("mixtral-8x7b", "--vram", "12GiB", "--expert-bits", "4")
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "RAM: embeddings │ 250 MiB │ beside the --ram budget" in text
    assert "32000 x 4096, bf16, in RAM" in text and "dense total │ 2.99 GiB │ on the GPU but the embeddings" in text
    assert "GPU: dense │ 2.75 GiB" in text  # 3,211,272,192 - 262,144,000 bytes
    cpu = " ".join(run("mixtral-8x7b", "--profile", "cpu-only").stdout.split())
    assert "RAM: embeddings" not in cpu and "in RAM:" not in cpu


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
    dense = sum(attention.values()) - attention["embeddings"]  # on a card the embeddings stay in RAM
    reserve = sum(mixtral_reserve_by_hand(4096, 256, True).values())
    # by hand: 87 slots (plan_memory's default dense bytes: the card's, the embeddings left out)
    total = (12 * GiB - dense - KV_4096 - reserve) // NF4_EXPERT
    plan = plan_memory(c, NF4_EXPERT, torch.bfloat16, 4096, vram=12 * GiB, device_type="cuda", expert_format="nf4",
                       attn_format="bf16")
    assert total == 87 and plan.device_slots == total and plan.slots_per_layer == 2
    assert plan.device_expert_bytes == total * NF4_EXPERT and plan.spread == "trace"
    trace = load_trace(MIXTRAL_DECODE)
    two, three = simulate(trace, 2, "lru").layer_hit_rates(), simulate(trace, 3, "lru").layer_hit_rates()
    gain = [b - a for a, b in zip(two, three)]
    best = sorted(range(32), key=lambda layer: (-gain[layer], layer))[: total - 64]
    assert [layer for layer, s in enumerate(plan.layer_slots) if s == 3] == sorted(best)
    assert "2-3/8 experts per layer on the device (2.72 on average)" in plan.describe()  # 87 / 32 = 2.72
    out = plan.to_dict()
    assert out["layer_slots"] == list(plan.layer_slots) and out["device_slots"] == 87
    # asked for evenly, the same 23 spare slots sit in the middles of 23 runs of layers
    even = plan_memory(c, NF4_EXPERT, torch.bfloat16, 4096, vram=12 * GiB, device_type="cuda", spread="even")
    assert even.layer_slots == spread_slots(87, 32, 8, 2) and even.spread == "even"


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
    plan = cuda_plan(vram=12 * GiB)  # 87 slots (test_12_gib_gives_the_spare_slots_to_the_layers_lru_gains_most)
    assert plan.device_slots == 87
    working = plan.reserve.working
    free = working + 70 * NF4_EXPERT + NF4_EXPERT // 2  # 70.5 slots' worth after the reserve
    fitted, note = fit_to_free(plan, free)
    assert fitted.device_slots == 70 and fitted.slots_per_layer == 2 and len(fitted.layer_slots) == 32
    assert fitted.host_experts == plan.host_experts and fitted.host_chunks == plan.host_chunks
    assert note is not None and "\n" not in note
    assert "70 expert slots" in note and "not the planned 87" in note and "2-3/8" in note


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
