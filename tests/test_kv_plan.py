"""The KV cache in the plan (issue 17): its bytes at 16 and 8 bits by hand and as the engine's
``KVCache`` allocates them, a sliding window's ring, the prefill chunk fitted to a card, and
Mixtral-8x7B at 32k context on a 12 GiB card."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from offload.config import ModelConfig
from offload.errors import SettingError
from offload.plan import (
    BUILTIN_MODELS,
    builtin_model,
    check_kv_bits,
    kv_cache_bytes,
    kv_positions,
    plan_model,
)
from tests.test_plan import mixtral_reserve_by_hand

GiB, MiB = 2**30, 2**20
NF4_EXPERT = 99_090_624  # FACTS.md: one Mixtral-8x7B expert in plain nf4 (94.5 MiB)


def mixtral() -> ModelConfig:
    return builtin_model("mixtral-8x7b")[1]


def shaped(**overrides) -> ModelConfig:
    """Mixtral-8x7B's config with ``overrides`` (a tiny shape, a sliding window)."""
    return ModelConfig.from_dict(dict(BUILTIN_MODELS["mixtral-8x7b"][1], **overrides), source="test")


def tiny(**overrides) -> ModelConfig:
    return shaped(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, vocab_size=512, max_position_embeddings=4096, **overrides)


# ---- bytes by hand ----------------------------------------------------------------------------


def test_mixtral_kv_cache_by_hand():
    c = mixtral()  # 32 layers, 8 KV heads of 128
    assert kv_cache_bytes(c, 1, torch.bfloat16) == 2 * 32 * 8 * 128 * 2 == 128 * 1024  # ARCHITECTURE.md: 128 KiB
    assert kv_cache_bytes(c, 32768, torch.bfloat16) == 4 * GiB
    assert kv_cache_bytes(c, 32768, torch.bfloat16, 16) == 4 * GiB  # 16 bits: the compute dtype
    assert kv_cache_bytes(c, 32768, torch.float32) == 8 * GiB
    # 8 bits: one int8 code a value, one scale per layer, KV head and position, for k and v, in the
    # compute dtype (offload.model.KVCache: 2 bytes in bf16, 4 in fp32)
    codes, scales = 2 * 32 * 8 * 32768 * 128, 2 * 32 * 8 * 32768 * 2
    assert (codes, scales) == (2 * GiB, 32 * MiB)
    assert kv_cache_bytes(c, 32768, torch.bfloat16, 8) == codes + scales
    assert kv_cache_bytes(c, 32768, torch.float32, 8) == codes + 2 * scales  # the codes are int8 whatever computes


def test_a_sliding_window_holds_the_window_and_one_chunk():
    windowed = shaped(sliding_window=1000)
    assert kv_positions(windowed, 4096) == 1000 + 256
    assert kv_positions(windowed, 4096, chunk=64) == 1064
    assert kv_positions(windowed, 800) == 800  # a context inside the window: all of it
    assert kv_positions(mixtral(), 4096) == 4096
    assert kv_cache_bytes(windowed, 4096, torch.bfloat16) == 1256 * 2 * 32 * 8 * 128 * 2
    assert kv_cache_bytes(windowed, 4096, torch.bfloat16, 8) == 1256 * 2 * 32 * 8 * (128 + 2)


@pytest.mark.parametrize("bits", [4, 32, 0, True, "8"])
def test_kv_bits_other_than_16_and_8_are_refused_in_one_line(bits):
    with pytest.raises(SettingError, match=r"^--kv-bits .*: choose one of 16, 8$"):
        check_kv_bits(bits)
    with pytest.raises(SettingError):
        kv_cache_bytes(mixtral(), 16, torch.bfloat16, bits)


@pytest.mark.parametrize("dtype, itemsize", [(torch.bfloat16, 2), (torch.float32, 4)])
def test_the_kv_reads_of_an_8_bit_cache_are_one_tensor_of_the_compute_dtype(dtype, itemsize):
    """``attention_bytes``' "kv reads": at 8 bits the S cached keys and values come back as one
    [2G, S, Dh] tensor in the compute dtype (codes times scales; CUDA casts the int8 codes as it
    reads them), at 16 bits a view (nothing); a sliding window's ring that wraps joins its two runs:
    one such tensor more at either width. By hand for Mixtral-8x7B (G 8, Dh 128), T 256."""
    from offload.plan import attention_bytes

    c, G, Dh = mixtral(), 8, 128
    for S in (4096, 32768):
        one = 2 * G * S * Dh * itemsize  # [2G, S, Dh]: bf16 at S 32768 is 128 MiB
        want = {(16, False): 0, (8, False): one, (16, True): one, (8, True): 2 * one}
        for (bits, ring), nbytes in want.items():
            parts = attention_bytes(c, dtype, 256, S, kv_bits=bits, ring=ring)
            assert parts["kv reads"] == nbytes, (S, bits, ring)
    assert attention_bytes(c, torch.bfloat16, 256, 32768, kv_bits=8)["kv reads"] == 128 * MiB
    # what the 8-bit cache adds to a chunk's attention: its writes (s + 9 bytes a value) and one read
    eight = attention_bytes(c, dtype, 256, 4096, kv_bits=8)
    sixteen = attention_bytes(c, dtype, 256, 4096)
    added = sum(eight.values()) - sum(sixteen.values())
    assert added == 2 * G * 256 * Dh * (itemsize + 9) + 2 * G * 4096 * Dh * itemsize


# ---- the plan's figure is the engine's allocation ---------------------------------------------


@pytest.mark.parametrize("bits", [16, 8])
@pytest.mark.parametrize("window", [None, 24], ids=["full", "window 24"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_bytes_are_what_the_kv_cache_allocates(bits, window, dtype):
    """``offload.model.KVCache(config, max_len, device, dtype, bits, chunk)`` as the engine makes it
    (``chunk`` the plan's prefill chunk): its ``nbytes``, summed from the tensors it holds (codes
    and scales), is the plan's figure, a sliding window's ring included."""
    from offload.model import KVCache

    config = tiny(sliding_window=window)
    for max_len, chunk in ((16, 256), (600, 256), (600, 64)):
        cache = KVCache(config, max_len, torch.device("cpu"), dtype, bits, chunk)
        held = sum(t.numel() * t.element_size() for t in (cache.kv, cache.scale) if t is not None)
        assert cache.nbytes == held == kv_cache_bytes(config, max_len, dtype, bits, chunk), (max_len, chunk)
        assert cache.capacity == kv_positions(config, max_len, chunk)


# ---- 32k context on a 12 GiB card --------------------------------------------------------------


WIDE = {"COLUMNS": "250"}  # the table on one line a row


def info_json(*args: str) -> dict:
    from cli.main import app

    result = CliRunner().invoke(app, ["info", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def nf4_matrix(out: int, inp: int) -> int:
    """One nf4 matrix, blocksize 64 (FACTS.md's 14336 x 4096: 29,360,128 + 3,670,080): the codes,
    4 bits a weight, one fp32 absmax per block of 64 and the 16-entry fp32 code table."""
    n = out * inp
    return n // 2 + n // 64 * 4 + 16 * 4


def nf4_dq_matrix(out: int, inp: int, alignment: int = 1) -> int:
    """One nf4-dq matrix (the format of --expert-bits 4 / --attn-bits 4), blocksize 64, nested
    blocksize 256, as bitsandbytes' compress_statistics keeps it: the 16-entry fp32 code table,
    one fp32 nested absmax per 256 blocks, the 256-entry fp32 nested map, the fp32 offset, one
    uint8 absmax code per block and the codes, 4 bits a weight; each tensor starting on an
    ``alignment`` boundary and the matrix padded to one (a record's 64; packed tight: 1)."""
    n = out * inp
    blocks = -(-n // 64)
    end = 0
    for size in (16 * 4, -(-blocks // 256) * 4, 256 * 4, 4, blocks, n // 2):
        end = -(-end // alignment) * alignment + size
    return -(-end // alignment) * alignment


# One Mixtral-8x7B expert record in nf4-dq: w1, w3 [14336, 4096], w2 [4096, 14336], every tensor on a
# 64-byte boundary (only the 4-byte offset is padded: 60 bytes a matrix). 86.67 MiB, nf4's 94.5 less 8%.
NF4_DQ_EXPERT = 3 * nf4_dq_matrix(14336, 4096, 64)
EMBEDDINGS = 32000 * 4096 * 2  # bf16 input embeddings: 250 MiB, kept in host RAM on a card (lm_head is untied)


def dense_by_hand(matrix) -> int:
    """Mixtral-8x7B's dense weights with attention in ``matrix``'s format: embeddings and lm_head,
    q, o [4096, 4096] and k, v [1024, 4096] in 32 layers, norms and routers in bf16."""
    return (2 * EMBEDDINGS + 32 * (2 * matrix(4096, 4096) + 2 * matrix(1024, 4096))
            + (2 * 32 + 1) * 4096 * 2 + 32 * 8 * 4096 * 2)


CARD_32K = ("mixtral-8x7b", "--vram", "12GiB", "--ram", "32GiB", "--expert-bits", "4", "--attn-bits", "4",
            "--kv-bits", "8", "--context", "32768")


def test_mixtral_at_32k_with_an_8_bit_kv_cache_holds_3_experts_a_layer_on_a_12_gib_card():
    """The issue's requirement: at 32k context with 4-bit (nf4-dq) experts and attention and an 8-bit
    KV cache, a 12 GiB card holds at least 3 experts a layer on average (96 slots or more). By
    hand: dense on the card 912.95 MiB (1.14 GiB less the 250 MiB of embeddings kept in RAM), KV
    2.03 GiB, reserve 861.32 MiB (its attention term reads the 8-bit keys and values back as one
    bf16 tensor; a 4-bit matmul dequantizes a 32 MiB slice), and 97 records of 86.67 MiB leave
    26.80 MiB spare: 3 a layer, one layer 4."""
    out = info_json(*CARD_32K)
    assert nf4_matrix(14336, 4096) == 29_360_128 + 3_670_080
    assert nf4_dq_matrix(14336, 4096) == 29_360_128 + 917_504 + 14_336 + 1_024 + 64 + 4
    assert NF4_DQ_EXPERT == 90_879_360 and 3 * nf4_matrix(14336, 4096) - NF4_DQ_EXPERT == 8_211_264
    dense = dense_by_hand(nf4_dq_matrix)  # packed tight, as attention is held
    device_dense = dense - EMBEDDINGS
    kv = 2 * 32 * 8 * 32768 * (128 + 2)  # int8 codes and bf16 scales: 2 GiB + 32 MiB
    reserve = sum(mixtral_reserve_by_hand(32768, 256, quantized=True, kv_bits=8).values())
    assert (out["expert_format"], out["attn_format"]) == ("nf4-dq", "nf4-dq")
    assert out["expert_bytes"] == NF4_DQ_EXPERT
    assert out["dense_bytes"] == dense and out["device_dense_bytes"] == device_dense and out["embeddings_on_host"]
    assert out["kv_cache_bytes"] == kv and out["kv_bits"] == 8
    assert out["reserve_bytes"] == reserve and out["prefill_chunk"] == 256
    assert reserve == 903_164_416  # 861.32 MiB
    slots = (12 * GiB - device_dense - kv - reserve) // NF4_DQ_EXPERT  # 97.31 -> 97
    assert out["device_experts"] == slots == 97 and slots / 32 >= 3 and out["slots_per_layer"] == 3
    assert sum(out["layer_slots"]) == 97 and sorted(out["layer_slots"]) == [3] * 31 + [4]
    assert out["device_bytes"] == device_dense + kv + 97 * NF4_DQ_EXPERT + reserve <= 12 * GiB
    assert 12 * GiB - out["device_bytes"] == 28_100_224 and out["disk_experts"] == 0  # 26.80 MiB spare
    # neither change alone gets there: nf4 records, or the embeddings on the card, fall short of 96
    assert (12 * GiB - device_dense - kv - reserve) // NF4_EXPERT == 89
    assert (12 * GiB - dense - kv - reserve) // NF4_DQ_EXPERT == 94


def test_the_16_bit_kv_cache_at_32k_fits_too_now_that_attention_is_fused():
    """Before, a chunk's fp32 [32, 256, 32768] scores were reserved (4.29 GiB of reserve): the card
    was refused. With the fused kernel the 4 GiB KV cache leaves 75 nf4-dq slots (dense on the
    card without the embeddings)."""
    out = info_json(*CARD_32K[:-4], "--context", "32768")
    reserve = sum(mixtral_reserve_by_hand(32768, 256, quantized=True).values())
    assert out["kv_bits"] == 16 and out["kv_cache_bytes"] == 4 * GiB and out["reserve_bytes"] == reserve
    device_dense = dense_by_hand(nf4_dq_matrix) - EMBEDDINGS
    assert out["device_experts"] == (12 * GiB - device_dense - 4 * GiB - reserve) // NF4_DQ_EXPERT == 75


def test_info_shows_the_8_bit_kv_row_and_the_prefill_chunk():
    from cli.main import app

    result = CliRunner().invoke(app, ["info", *CARD_32K], env=WIDE)
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "KV cache │ 2.03 GiB │ context 32768, 8-bit: int8 keys and values" in text
    assert "prefill chunk │ 256 tokens │ the default" in text
    given = CliRunner().invoke(app, ["info", *CARD_32K, "-b", "64"], env=WIDE)
    assert given.exit_code == 0, given.output
    assert "prefill chunk │ 64 tokens │ -b/--batch-size 64" in " ".join(given.stdout.split())


def test_batch_size_sizes_the_reserve():
    out = info_json(*CARD_32K, "--batch-size", "64")
    assert out["prefill_chunk"] == 64 and out["reserve"]["prefill_tokens"] == 64
    assert out["reserve_bytes"] == sum(mixtral_reserve_by_hand(32768, 64, quantized=True, kv_bits=8).values())


def test_a_card_that_needs_a_smaller_chunk_plans_one_and_says_so():
    c, four = mixtral(), "nf4-dq"  # the format of --expert-bits 4 and --attn-bits 4
    at_256 = plan_model("m", c, torch.bfloat16, 4096, four, four, experts_per_layer=2).min_vram
    plan = plan_model("m", c, torch.bfloat16, 4096, four, four, vram=at_256 - 1)
    assert plan.memory.prefill_chunk == 128 and plan.min_vram <= at_256 - 1
    from cli.main import app

    result = CliRunner().invoke(app, ["info", "mixtral-8x7b", "--vram", f"{at_256 - 1}B", "--expert-bits", "4",
                                      "--attn-bits", "4"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "prefill chunk │ 128 tokens │ fitted: the reserve at the default 256" in " ".join(result.stdout.split())


def test_a_16_bit_kv_cache_too_large_for_the_card_hints_at_8_bits():
    """At 32k and 4-bit weights the least card with a 16-bit KV cache (4 GiB) is 10.97 GiB by hand
    (dense on the card, top-2 records a layer, the reserve at chunks of 16); a byte less is refused,
    and the 8-bit cache (2.03 GiB) fits there."""
    from cli.main import app

    device_dense = dense_by_hand(nf4_dq_matrix) - EMBEDDINGS
    least = (device_dense + 4 * GiB + 64 * NF4_DQ_EXPERT
             + sum(mixtral_reserve_by_hand(32768, 16, quantized=True).values()))
    assert f"{least / GiB:.2f}" == "10.97"
    four = ("--expert-bits", "4", "--attn-bits", "4", "--context", "32768")
    result = CliRunner().invoke(app, ["info", "mixtral-8x7b", "--vram", f"{least - 1}B", *four])
    assert result.exit_code == 2
    assert "with --kv-bits 8" in result.output and len(result.output.strip().splitlines()) == 1
    assert info_json("mixtral-8x7b", "--vram", f"{least - 1}B", *four, "--kv-bits", "8")["device_bytes"] <= least - 1
    assert info_json("mixtral-8x7b", "--vram", f"{least}B", *four)["min_vram_bytes"] == least


def test_info_refuses_other_kv_bits_in_one_line():
    from cli.main import app

    result = CliRunner().invoke(app, ["info", "mixtral-8x7b", "--kv-bits", "4"])
    assert result.exit_code == 2 and "--kv-bits 4: choose one of 16, 8" in result.output
    assert len(result.output.strip().splitlines()) == 1
