"""`offload info`: the memory plan, checked against bitsandbytes' own bytes and hand arithmetic."""

from __future__ import annotations

import json
import logging
import math
import warnings

import pytest
import torch
import typer
from typer.testing import CliRunner

from cli.info import info_command
from offload.config import ModelConfig
from offload.experts.record import MATRIX_ALIGNMENT, RecordLayout, align_up
from offload.plan import (
    BUILTIN_MODELS,
    builtin_model,
    dense_bytes,
    dense_bytes_by_class,
    kv_cache_bytes,
    plan_memory,
)
from tests.model_builder import WIDE, WINDOWED
from tests.test_kv_plan import dense_by_hand, nf4_dq_matrix
from tests.test_plan import mixtral_reserve_by_hand

GiB = 2**30
# Mixtral-8x7B by hand: D 4096, I 14336, 32 layers, 32 query / 8 KV heads of 128, vocab 32000.
BF16_EXPERT = 3 * 4096 * 14336 * 2  # 352,321,536
BF16_DENSE = 2 * (
    2 * 32000 * 4096  # embeddings + lm_head
    + 32 * 4096 * 128 * (2 * 32 + 2 * 8)  # q, o [4096, 4096]; k, v [1024, 4096]
    + (2 * 32 + 1) * 4096  # two norms a layer + the final norm
    + 32 * 8 * 4096  # routers
)  # 3,211,272,192
KV_4096 = 2 * 32 * 8 * 4096 * 128 * 2  # K and V, bf16: 512 MiB
EMBEDDINGS = 32000 * 4096 * 2  # the bf16 input table, 250 MiB: in host RAM on a card (lm_head is untied)
# The runtime reserve on a card (offload.plan.runtime_reserve), its terms written out by hand.
RESERVE_BF16 = sum(mixtral_reserve_by_hand(4096, 256, quantized=False).values())  # 729,625,088: fused attention
RESERVE_NF4 = sum(mixtral_reserve_by_hand(4096, 256, quantized=True).values())  # + a 32 MiB dequantized slice


def cli_app() -> typer.Typer:
    """cli.main's app once it registers info_command; until then, a local app with only it."""
    from cli.main import app

    if any(c.name == "info" for c in app.registered_commands):
        return app
    app = typer.Typer()
    app.callback()(lambda: None)  # keep "info" a subcommand, as in cli.main
    app.command("info")(info_command)
    return app


def run(*args: str):
    return CliRunner().invoke(cli_app(), ["info", *args])


def info_json(*args: str) -> dict:
    result = run(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def summary_line(result) -> str:
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[-1].startswith("estimate: ") or not any(line.startswith("estimate") for line in lines)
    return next(line for line in reversed(lines) if not line.startswith("estimate: "))


def bnb_state_tensors(weight: torch.Tensor, double_quant: bool) -> list[torch.Tensor]:
    """bitsandbytes' own nf4 quantization of ``weight`` (blocksize 64): its tensors in the order
    offload.quant documents for the record, nf4 absmax, code, data; nf4-dq (compress_statistics:
    absmax as uint8 codes, their fp32 absmax per 256 blocks, the 256-entry map and the offset)
    code, nested absmax, nested code, offset, absmax codes, data."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    with warnings.catch_warnings():  # torch.jit deprecation noise from bitsandbytes' import
        warnings.simplefilter("ignore", DeprecationWarning)
        import bitsandbytes.functional as F

    data, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    if not double_quant:
        return [state.absmax, state.code, data]
    assert state.absmax.dtype == torch.uint8 and state.state2.blocksize == 256
    return [state.code, state.state2.absmax, state.state2.code, state.offset, state.absmax, data]


@pytest.fixture(scope="module", params=["nf4", "nf4-dq"])
def bnb_expert(request) -> dict:
    """One Mixtral expert quantized by bitsandbytes itself (nf4 or nf4-dq, blocksize 64): the raw
    sum of its tensors, and that sum laid out as a record is (each tensor and each matrix starting
    on a 64-byte boundary, tensors in the documented order). w1 and w3 share a shape, so w1's
    bytes count twice. Two real-size quantizations a format: 5-10 s on two busy cores."""
    fmt = request.param
    generator = torch.Generator().manual_seed(0)
    raw = aligned = tensors = 0
    for shape, count in (((14336, 4096), 2), ((4096, 14336), 1)):  # w1 and w3, then w2
        weight = torch.randn(shape, generator=generator)  # fp32, as a checkpoint's weight upcast
        parts = bnb_state_tensors(weight, double_quant=fmt == "nf4-dq")
        sizes = [t.numel() * t.element_size() for t in parts]
        end = 0
        for size in sizes:
            end = align_up(end, MATRIX_ALIGNMENT) + size
        raw += count * sum(sizes)
        aligned += count * align_up(end, MATRIX_ALIGNMENT)
        tensors += count * len(parts)
    return {"format": fmt, "raw": raw, "aligned": aligned, "tensors": tensors}


# One Mixtral-8x7B expert record by hand: nf4 (FACTS.md's measured figure, 94.5 MiB) and nf4-dq, the
# format of --expert-bits 4 (86.67 MiB: per 14336 x 4096 matrix the codes 29,360,128 bytes, 917,504
# uint8 absmax codes, 3,584 fp32 nested absmax, the 256- and 16-entry fp32 maps and the fp32 offset,
# which alone is padded to 64: 30,293,120 bytes)
NF4_EXPERT = 99_090_624
NF4_DQ_EXPERT = 3 * (29_360_128 + 917_504 + 3_584 * 4 + 256 * 4 + 16 * 4 + 64)  # 90,879,360
# --expert-bits 4 and --attn-bits 4 mean nf4-dq; plain nf4 stays available by name
BITS_4, NF4 = ("--expert-bits", "4"), ("--expert-format", "nf4")
# The least card for --expert-bits 4 (bf16 attention) at context 4096: the dense weights but the
# embeddings, the KV cache, top-2 nf4-dq records a layer, the reserve at the smallest chunk (16):
# 10,011,359,744 bytes, 9.32 GiB
MIN_4BIT = (BF16_DENSE - EMBEDDINGS + KV_4096 + 64 * NF4_DQ_EXPERT
            + sum(mixtral_reserve_by_hand(4096, 16, quantized=True).values()))


def test_4_bit_experts_are_what_bitsandbytes_produces(bnb_expert):
    """--expert-bits 4 is bitsandbytes' double-quantized nf4 (compress_statistics=True); plain nf4
    (compress_statistics=False) by name, --expert-format nf4."""
    fmt = bnb_expert["format"]
    out = info_json("mixtral-8x7b", *(BITS_4 if fmt == "nf4-dq" else NF4))
    assert out["expert_format"] == fmt
    # The record holds exactly bitsandbytes' tensors, 64-byte aligned; the alignment adds less
    # than 64 bytes a tensor (for Mixtral's shapes, nf4: nothing, every tensor is a multiple of 64;
    # nf4-dq: 60 bytes a matrix after the 4-byte offset).
    assert out["expert_bytes"] == bnb_expert["aligned"]
    assert 0 <= out["expert_bytes"] - bnb_expert["raw"] < 64 * bnb_expert["tensors"]
    assert out["expert_bytes"] == {"nf4": NF4_EXPERT, "nf4-dq": NF4_DQ_EXPERT}[fmt] == bnb_expert["aligned"]
    assert out["expert_bytes"] - bnb_expert["raw"] == {"nf4": 0, "nf4-dq": 3 * 60}[fmt]
    assert out["experts_total"] == 256
    assert out["experts_total_bytes"] == 256 * out["expert_bytes"]


def test_bf16_sizes_by_hand():
    out = info_json("mixtral-8x7b", "--expert-bits", "16")
    assert (out["expert_format"], out["attn_format"], out["dtype"]) == ("bf16", "bf16", "bfloat16")
    assert out["expert_bytes"] == BF16_EXPERT == 352_321_536
    assert out["experts_total_bytes"] == 256 * BF16_EXPERT
    assert out["dense_bytes"] == BF16_DENSE == sum(out["dense_bytes_by_class"].values())
    # the card holds every dense weight but the input embeddings, which stay in RAM
    assert out["embeddings_on_host"] and out["device_dense_bytes"] == BF16_DENSE - EMBEDDINGS
    assert out["kv_cache_bytes"] == KV_4096
    assert RESERVE_BF16 == 729_625_088 and out["reserve_bytes"] == RESERVE_BF16
    on_card = BF16_DENSE - EMBEDDINGS + KV_4096 + RESERVE_BF16
    assert out["min_vram_bytes"] == on_card + 32 * 2 * BF16_EXPERT
    assert out["all_resident_vram_bytes"] == on_card + 256 * BF16_EXPERT
    assert out["vram_bytes"] is None and out["slots_per_layer"] == 2  # no card: the plan at the minimum
    assert out["estimate"] is None  # no budget, no profile: no speed to estimate


def test_12gib_card_with_32gib_ram_holds_4bit_mixtral_without_disk():
    """nf4-dq records (--expert-bits 4), bf16 attention; the card holds the dense weights but the
    250 MiB of embeddings: 95 slots, 2 a layer and 31 spare (84 with nf4 and the table on the card)."""
    args = ("mixtral-8x7b", "--vram", "12GiB", "--ram", "32GiB", "--expert-bits", "4")
    out = info_json(*args)
    record = RecordLayout.for_config(builtin_model("mixtral-8x7b")[1], "nf4-dq").nbytes
    assert record == NF4_DQ_EXPERT
    dense = BF16_DENSE - EMBEDDINGS
    slots = (12 * GiB - dense - KV_4096 - RESERVE_NF4) // record  # 95.02 -> 95: 2 a layer, 31 spare
    assert (12 * GiB - BF16_DENSE - KV_4096 - RESERVE_NF4) // NF4_EXPERT == 84  # nf4, the embeddings on the card
    assert out["device_experts"] == slots == 95 and sum(out["layer_slots"]) == 95
    assert out["slots_per_layer"] == 2 and sorted(set(out["layer_slots"])) == [2, 3]
    assert out["host_experts"] == 256 and out["disk_experts"] == 0
    # pinned blocks, not 32 GiB: 16 GiB hold floor(16 GiB / record) = 189 records, 4 GiB 47, 2 GiB the last 20
    assert (16 * GiB // record, 4 * GiB // record, 2 * GiB // record) == (189, 47, 23)
    assert out["host_chunks"] == [189, 47, 20] and out["host_bytes"] == 22 * GiB
    assert out["host_raw_bytes"] == 256 * record
    assert out["device_bytes"] == dense + KV_4096 + 95 * record + RESERVE_NF4 <= 12 * GiB
    line = summary_line(run(*args))
    assert line.startswith("A 12 GiB card with a 32 GiB expert RAM budget holds Mixtral-8x7B (nf4-dq experts)")
    assert "2-3 of 8 experts per layer on the GPU (2.97 on average)" in line and "no disk reads" in line


def test_small_ram_needs_the_disk_tier():
    out = info_json("mixtral-8x7b", "--vram", "12GiB", "--ram", "8GiB", "--expert-bits", "4")
    record = out["expert_bytes"]
    assert out["host_experts"] == 8 * GiB // record  # one pinned block of exactly 8 GiB holds them
    assert out["disk_experts"] == 256 - out["host_experts"] > 0
    line = summary_line(run("mixtral-8x7b", "--vram", "12GiB", "--ram", "8GiB", "--expert-bits", "4"))
    assert f"{out['disk_experts']} are read from disk" in line


def test_attention_bits_shrink_only_attention():
    full = info_json("mixtral-8x7b", "--expert-bits", "4")
    four = info_json("mixtral-8x7b", "--expert-bits", "4", "--attn-bits", "4")
    assert four["attn_format"] == "nf4-dq"
    shapes = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096)]
    # packed tight, by hand from nf4-dq's tensors: 8,655,940 bytes for q and o, 2,164,804 for k and v
    assert (nf4_dq_matrix(4096, 4096), nf4_dq_matrix(1024, 4096)) == (8_655_940, 2_164_804)
    assert four["dense_bytes_by_class"]["attention"] == 32 * sum(nf4_dq_matrix(*s) for s in shapes)
    assert four["dense_bytes"] == dense_by_hand(nf4_dq_matrix)
    # plain nf4 attention by name (no flag for it): one fp32 absmax a block instead of a uint8 code
    nf4 = dense_bytes_by_class(builtin_model("mixtral-8x7b")[1], torch.bfloat16, "nf4")["attention"]
    assert nf4 == 32 * sum(s[0] * s[1] // 2 + s[0] * s[1] // 64 * 4 + 64 for s in shapes)
    for name in ("embeddings", "lm_head", "norms", "routers"):
        assert four["dense_bytes_by_class"][name] == full["dense_bytes_by_class"][name]
    assert four["min_vram_bytes"] == full["min_vram_bytes"] - full["dense_bytes"] + four["dense_bytes"]


def test_expert_format_overrides_and_conflicts():
    out = info_json("mixtral-8x7b", "--expert-format", "nf4-dq")
    assert out["expert_format"] == "nf4-dq"
    assert out["expert_bytes"] == RecordLayout.for_config(builtin_model("mixtral-8x7b")[1], "nf4-dq").nbytes
    assert out["expert_bytes"] < 99_090_624
    result = run("mixtral-8x7b", "--expert-format", "nf4", "--expert-bits", "4")
    assert result.exit_code == 2 and "not both" in result.output


def test_mixtral_8x22b_is_built_in():
    out = info_json("Mixtral-8x22B", "--expert-bits", "8")
    assert out["model"] == "Mixtral-8x22B" and out["experts_total"] == 56 * 8
    assert out["expert_bytes"] == RecordLayout.for_config(builtin_model("mixtral-8x22b")[1], "int8").nbytes
    assert out["kv_cache_bytes"] == 2 * 56 * 8 * 4096 * 128 * 2


@pytest.mark.parametrize(
    "args",
    [["--vram", "1GiB"], ["--vram", f"{MIN_4BIT - 1}B", "--expert-bits", "4"]],
    ids=["bf16 on 1 GiB", "4-bit a byte under the minimum"],
)
def test_too_small_a_card_exits_2_naming_the_minimum(args):
    result = run("mixtral-8x7b", *args)
    assert result.exit_code == 2
    assert "minimum" in result.output and len(result.output.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_the_4_bit_minimum_by_hand_fits():
    assert MIN_4BIT == 10_011_359_744
    out = info_json("mixtral-8x7b", "--vram", f"{MIN_4BIT}B", "--expert-bits", "4")
    assert out["device_bytes"] == out["min_vram_bytes"] == MIN_4BIT
    assert out["prefill_chunk"] == 16 and out["slots_per_layer"] == 2


@pytest.mark.parametrize("bad", [["mixtral-8x99b"], ["mixtral-8x7b", "--expert-bits", "5"],
                                 ["mixtral-8x7b", "--context", "40000"], ["mixtral-8x7b", "--vram", "lots"]],
                         ids=["unknown model", "bits", "context", "size"])
def test_user_errors_are_one_line_and_exit_2(bad):
    result = run(*bad)
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and result.output.startswith("error:")


def test_checkpoint_directory(model_dirs):
    d = model_dirs[WINDOWED.name]
    config = ModelConfig.from_dir(d)
    out = info_json(str(d), "--ram", "0", "--vram", "1GiB")  # a tiny model, and the card's runtime reserve
    assert out["model"] == d.name and out["context"] == 512  # the model's maximum, below 4096
    assert out["expert_format"] == "bf16"
    assert out["expert_bytes"] == RecordLayout.for_config(config, torch.bfloat16).nbytes
    assert out["experts_total"] == config.num_hidden_layers * config.num_local_experts
    assert out["dense_bytes"] == dense_bytes(config, torch.bfloat16)
    assert out["kv_cache_bytes"] == kv_cache_bytes(config, 512, torch.bfloat16)
    assert out["slots_per_layer"] == config.num_local_experts  # a tiny model fits whole
    assert out["host_experts"] == 0 and out["disk_experts"] == 0


def test_pack_plans_its_own_expert_format(model_dirs, tmp_path):
    from offload.pack import convert

    pack = convert(model_dirs[WINDOWED.name], tmp_path / "pack", dtype=torch.float32, expert_format="nf4")
    out = info_json(str(pack))
    assert out["expert_format"] == "nf4" and out["dtype"] == "bfloat16"
    assert out["expert_bytes"] == RecordLayout.for_config(ModelConfig.from_dir(pack), "nf4").nbytes


@pytest.mark.parametrize("name", list(BUILTIN_MODELS))
def test_dense_classes_sum_to_dense_bytes(name):
    config = builtin_model(name)[1]
    for dtype in (torch.bfloat16, torch.float32):
        assert sum(dense_bytes_by_class(config, dtype).values()) == dense_bytes(config, dtype)


def test_dense_classes_of_tied_embeddings(model_dirs):
    config = ModelConfig.from_dir(model_dirs[WIDE.name])  # tie_word_embeddings
    by = dense_bytes_by_class(config, torch.float32)
    assert by["lm_head"] == 0 and sum(by.values()) == dense_bytes(config, torch.float32)


def test_plan_memory_dense_override_keeps_the_default():
    config = builtin_model("mixtral-8x7b")[1]
    plain = plan_memory(config, BF16_EXPERT, torch.bfloat16, 4096, vram=40 * GiB)
    same = plan_memory(config, BF16_EXPERT, torch.bfloat16, 4096, vram=40 * GiB, dense=BF16_DENSE)
    smaller = plan_memory(config, BF16_EXPERT, torch.bfloat16, 4096, vram=40 * GiB, dense=BF16_DENSE - 2 * GiB)
    assert plain == same and plain.dense_bytes == BF16_DENSE
    assert smaller.dense_bytes == BF16_DENSE - 2 * GiB and smaller.slots_per_layer >= plain.slots_per_layer


@pytest.mark.parametrize("profile", ["rtx-3060-12gb", "rtx-4090-24gb", "t4-16gb", "rtx-4060-8gb"])
def test_info_plans_mixtral_for_each_shipped_card(profile):
    """A shipped card's plan by hand: its plan.vram less the dense weights on the card (nf4-dq
    attention, the 250 MiB of embeddings in RAM), KV cache and the runtime reserve (its
    dequantized-weight term is one 32 MiB slice of a 4-bit matrix), in nf4-dq expert records
    (4-bit widths); RAM holds all 256 in 22 GiB of pinned blocks."""
    from offload.profile import load_profile

    p = load_profile(profile)
    assert (p.expert_bits, p.attn_bits) == (4, 4)
    record = NF4_DQ_EXPERT
    dense = dense_by_hand(nf4_dq_matrix) - EMBEDDINGS
    kv = 2 * 32 * 8 * p.context * 128 * 2
    reserve = sum(mixtral_reserve_by_hand(p.context, 256, quantized=True, sdpa=p.sdpa).values())  # T4: math path
    slots = (p.plan_vram_bytes - dense - kv - reserve) // record
    out = info_json("mixtral-8x7b", "--profile", profile)
    assert (out["expert_format"], out["attn_format"], out["device_type"]) == ("nf4-dq", "nf4-dq", "cuda")
    assert out["expert_bytes"] == record and out["device_dense_bytes"] == dense and out["reserve_bytes"] == reserve
    assert out["device_experts"] == slots and out["slots_per_layer"] == slots // 32 >= 2
    assert max(out["layer_slots"]) == slots // 32 + (slots % 32 > 0)
    assert out["device_bytes"] == dense + kv + slots * record + reserve <= p.plan_vram_bytes
    assert out["disk_experts"] == 0 and out["host_bytes"] == 22 * GiB
    assert out["estimate"]["tokens_per_s"] > 0 and out["estimate"]["summary"].startswith("estimate: ")


def test_the_8_gb_card_holds_mixtral_again():
    """The 4060's 7.4 GiB plan at context 1024: dense on the card 912.95 MiB, KV 128 MiB, the
    reserve at chunks of 256 727.82 MiB and top-2 nf4-dq records a layer (5.42 GiB) take 7.14 GiB,
    67 slots in 7.4; with nf4 records and the embeddings on the card the minimum is 7.89 GiB even
    in chunks of 16, and the card was refused."""
    from tests.test_kv_plan import nf4_matrix

    kv = 2 * 32 * 8 * 1024 * 128 * 2
    dense = dense_by_hand(nf4_dq_matrix) - EMBEDDINGS
    reserve = sum(mixtral_reserve_by_hand(1024, 256, quantized=True).values())
    plan_vram = int(7.4 * GiB)
    assert (plan_vram - dense - kv - reserve) // NF4_DQ_EXPERT == 67
    before = dense_by_hand(nf4_matrix) + kv + 64 * NF4_EXPERT + sum(mixtral_reserve_by_hand(1024, 16, True).values())
    assert f"{before / GiB:.2f}" == "7.89" and before > plan_vram
    out = info_json("mixtral-8x7b", "--profile", "rtx-4060-8gb")
    assert out["vram_bytes"] == plan_vram and out["context"] == 1024 and out["prefill_chunk"] == 256
    assert out["min_vram_bytes"] == dense + kv + 64 * NF4_DQ_EXPERT + reserve
    assert out["device_experts"] == 67 and out["slots_per_layer"] == 2 and out["device_bytes"] <= plan_vram


def test_info_plans_the_cpu_profile_resident_on_the_cpu():
    out = info_json("mixtral-8x7b", "--profile", "cpu-only")
    assert out["device_type"] == "cpu" and out["reserve_bytes"] == 0
    assert out["slots_per_layer"] == 8 and out["host_experts"] == 0 and out["experts_per_layer"] == 8
    assert out["estimate"]["hit_source"] == "every expert resident" and out["estimate"]["load_s"] == 0


def test_info_says_where_misses_run_and_keeps_the_transfer_only_figure():
    def last(*flags: str) -> str:
        result = run("mixtral-8x7b", "--vram", "12GiB", "--expert-bits", "4", *flags)
        assert result.exit_code == 0, result.output
        return result.stdout.strip().splitlines()[-1]

    auto = last()  # the engine's default, auto, on the stated host (65 GB/s of RAM, the kernel at 0.6)
    assert auto.startswith("estimate: ") and "with --cpu-experts auto" in auto and "transfer only: " in auto
    assert "RAM 65 GB/s x 0.6, round trip 0.10 ms" in auto
    off = last("--cpu-experts", "off")
    assert "--cpu-experts" not in off and "RAM" not in off
    transfer = off.split("estimate: ")[1].split(" tok/s")[0]
    assert f"transfer only: {transfer} tok/s" in auto  # the same transfer-only figure beside the hybrid one
    assert "every expert use" in last("--cpu-experts", "all")


# ---- with --vram alone: the plan generate would run on such a card (the shipped profile, fitted) ----


@pytest.mark.parametrize("gib, profile", [(12, "rtx-3060-12gb"), (16, "t4-16gb"), (24, "rtx-4090-24gb")])
def test_vram_alone_plans_the_shipped_profile_for_that_card_and_fits(gib, profile):
    out = info_json("mixtral-8x7b", "--vram", f"{gib}GiB")
    assert out["profile"]["name"] == profile and out["profile"]["auto"] and out["profile"]["fits"]
    assert (out["profile"]["expert_bits"], out["profile"]["attn_bits"]) == (4, 4)  # the profile's widths
    assert (out["expert_format"], out["attn_format"], out["context"]) == ("nf4-dq", "nf4-dq", 4096)
    assert out["vram_bytes"] == gib * GiB and out["device_bytes"] <= gib * GiB
    assert out["disk_experts"] == 0 and out["slots_per_layer"] >= 2
    # the same plan as the flags that say it, so the plan is what those widths give on that card; but
    # a T4 has no flash kernel (its profile says sdpa = "math"), which flags do not say: a larger reserve
    explicit = info_json("mixtral-8x7b", "--vram", f"{gib}GiB", "--expert-bits", "4", "--attn-bits", "4")
    assert explicit["profile"] is None and explicit["reserve"]["sdpa"] == "fused"
    if out["reserve"]["sdpa"] == "fused":
        assert explicit["layer_slots"] == out["layer_slots"] and explicit["device_bytes"] == out["device_bytes"]
    else:
        assert profile == "t4-16gb" and out["reserve_bytes"] > explicit["reserve_bytes"] + 400 * 2**20
        assert out["device_experts"] < explicit["device_experts"]
    result = run("mixtral-8x7b", "--vram", f"{gib}GiB")
    first = result.stdout.splitlines()[0]
    assert first.startswith(f"profile: {profile} (auto: the shipped profile for a {gib} GiB card; 4-bit weights, ")
    assert first.endswith("; --profile, --expert-bits or --attn-bits to choose")
    assert summary_line(result).startswith(f"A {gib} GiB card holds Mixtral-8x7B (nf4-dq experts)")


def test_explicit_bits_plan_what_they_say_without_a_profile():
    out = info_json("mixtral-8x7b", "--vram", "40GiB", "--expert-bits", "8")
    assert out["profile"] is None and out["expert_format"] == "int8" and out["attn_format"] == "bf16"


def test_an_8_gib_card_holds_mixtral_at_its_profiles_context():
    """With fused attention (no score matrix in the reserve) top-2 nf4-dq experts per layer, nf4-dq
    attention, the KV cache at context 1024 and the reserve fit 8 GiB at the default chunk of 256:
    the minimum is 7.14 GiB (dense on the card, the embeddings in RAM), 74 slots in all."""
    out = info_json("mixtral-8x7b", "--vram", "8GiB")
    assert out["profile"]["name"] == "rtx-4060-8gb" and out["profile"]["fits"] and out["context"] == 1024
    dense = dense_by_hand(nf4_dq_matrix) - EMBEDDINGS
    kv = 2 * 32 * 8 * 1024 * 128 * 2
    reserve = sum(mixtral_reserve_by_hand(1024, 256, quantized=True).values())
    assert out["min_vram_bytes"] == dense + kv + 64 * NF4_DQ_EXPERT + reserve == 7_670_977_536  # 7.14 GiB
    assert out["device_experts"] == (8 * GiB - dense - kv - reserve) // NF4_DQ_EXPERT == 74
    assert out["slots_per_layer"] == 2 and out["prefill_chunk"] == 256 and out["device_bytes"] <= 8 * GiB


def test_every_card_the_8_gb_profile_is_picked_for_holds_mixtral_at_its_context():
    """The 4060's profile is picked from 0.95 x 8 GiB (offload.profile.NOMINAL_SLACK) up; at its
    context 1024 the least a plan needs, top-2 records a layer and the reserve in chunks of 16,
    is 7.09 GiB, below that: no card it is picked for is refused at the profile's context."""
    dense = dense_by_hand(nf4_dq_matrix) - EMBEDDINGS
    least = (dense + 2 * 32 * 8 * 1024 * 128 * 2 + 64 * NF4_DQ_EXPERT
             + sum(mixtral_reserve_by_hand(1024, 16, quantized=True).values()))
    smallest = math.ceil(0.95 * 8 * GiB)  # 7.6 GiB
    assert f"{least / GiB:.2f}" == "7.09" and least < smallest
    out = info_json("mixtral-8x7b", "--vram", f"{smallest}B")
    assert out["profile"]["name"] == "rtx-4060-8gb" and out["profile"]["fits"] and out["context"] == 1024
    assert out["device_bytes"] <= smallest and out["slots_per_layer"] == 2
    assert run("mixtral-8x7b", "--vram", f"{smallest - 1}B").stderr.count("no shipped profile is for a card this small")


def test_a_card_just_under_8_gib_at_a_long_context_is_refused_naming_the_flags_and_the_largest_context_that_fit():
    """At context 16384 the 4060's profile at its narrowest widths needs 8.97 GiB by hand (dense on
    the card, a 2 GiB KV cache, top-2 nf4-dq records a layer, the reserve in chunks of 16)."""
    dense = dense_by_hand(nf4_dq_matrix) - EMBEDDINGS
    minimum = (dense + 2 * 32 * 8 * 16384 * 128 * 2 + 64 * NF4_DQ_EXPERT
               + sum(mixtral_reserve_by_hand(16384, 16, quantized=True).values()))
    assert f"{minimum / GiB:.2f}" == "8.97"
    result = run("mixtral-8x7b", "--vram", "7.9GiB", "--context", "16384")
    assert result.exit_code == 2 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: --vram 7.90 GiB is below the minimum 8.97 GiB")
    assert "(prefill chunks of 16 tokens)" in line  # the least any chunk needs
    assert "profile rtx-4060-8gb (auto) fits at none of its widths, down to nf4-dq experts and nf4-dq attention " \
           "at context 16384" in line
    context = int(line.split("--context ")[1].split(" ")[0])
    assert "the largest that fits" in line and "or on --vram 8.97GiB or more" in line
    # the context it names fits, one more does not; the --vram it names fits
    fits = info_json("mixtral-8x7b", "--vram", "7.9GiB", "--context", str(context))
    assert fits["profile"]["name"] == "rtx-4060-8gb" and fits["device_bytes"] <= 7.9 * GiB
    assert fits["context"] == context and fits["min_vram_bytes"] <= 7.9 * GiB
    over = run("mixtral-8x7b", "--vram", "7.9GiB", "--context", str(context + 1))
    assert over.exit_code == 2 and "below the minimum" in over.stderr
    named = info_json("mixtral-8x7b", "--vram", "8.97GiB", "--context", "16384")
    assert named["expert_format"] == "nf4-dq" and named["min_vram_bytes"] == minimum <= 8.97 * GiB


def test_16_bit_experts_on_a_12_gib_card_suggest_4_bits():
    result = run("mixtral-8x7b", "--vram", "12GiB", "--expert-bits", "16")
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    # the minimum by hand: dense but the embeddings, KV, top-2 bf16 experts a layer, the reserve at chunk 16
    minimum = (BF16_DENSE - EMBEDDINGS + KV_4096 + 64 * BF16_EXPERT
               + sum(mixtral_reserve_by_hand(4096, 16, quantized=False).values()))
    assert f"{minimum / GiB:.2f}" == "24.88"
    assert "below the minimum 24.88 GiB" in line and "Mixtral-8x7B fits with --expert-bits 4, or on --vram 24.88GiB" in line
    assert "--context" not in line  # no context makes bf16 experts fit 12 GiB
    assert info_json("mixtral-8x7b", "--vram", "12GiB", "--expert-bits", "4")["device_bytes"] <= 12 * GiB
    four = run("mixtral-8x7b", "--vram", f"{MIN_4BIT - 1}B", "--expert-bits", "4")
    assert "fits with --attn-bits 8, or with --kv-bits 8" in four.stderr and "--context " in four.stderr  # widest first


def test_a_card_below_every_shipped_profile_plans_plain_defaults(model_dirs):
    out = info_json(str(model_dirs[WINDOWED.name]), "--vram", "1GiB")
    assert out["profile"]["name"] == "none" and not out["profile"]["fits"]
    assert "no shipped GPU profile fits a card of 1.00 GiB" in out["profile"]["reason"]
    assert out["expert_format"] == "bf16" and out["slots_per_layer"] == 8


def test_ram_is_called_the_expert_ram_budget_with_its_article():
    line = summary_line(run("mixtral-8x7b", "--vram", "12GiB", "--ram", "16GiB"))
    assert line.startswith("A 12 GiB card with a 16 GiB expert RAM budget holds Mixtral-8x7B (nf4-dq experts)")
    assert "of RAM" not in line and "are read from disk" in line  # --ram below the experts: a disk tier, as asked
    line = summary_line(run("mixtral-8x7b", "--vram", "8.5GiB", "--ram", "8GiB"))
    assert line.startswith("An 8.50 GiB card with an 8 GiB expert RAM budget holds")
    line = summary_line(run("mixtral-8x7b", "--vram", "18GiB", "--ram", "11GiB"))
    assert line.startswith("An 18 GiB card with an 11 GiB expert RAM budget holds")


@pytest.mark.parametrize("flag", ["--vram", "--ram"])
def test_a_bare_number_is_refused_naming_the_setting_and_a_unit(flag):
    result = run("mixtral-8x7b", "--vram", "12GiB", flag, "12")
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {flag} 12: a size needs a unit: 12GiB")


def test_sizes_as_people_write_them():
    binary = info_json("mixtral-8x7b", "--vram", "24GiB")
    assert info_json("mixtral-8x7b", "--vram", "24G")["vram_bytes"] == binary["vram_bytes"] == 24 * GiB
    assert info_json("mixtral-8x7b", "--vram", "24Gi")["layer_slots"] == binary["layer_slots"]
    decimal = run("mixtral-8x7b", "--vram", "24GB", "--json")
    assert decimal.exit_code == 0 and json.loads(decimal.stdout)["vram_bytes"] == 24 * 10**9
    assert "note: --vram 24GB is decimal: 24,000,000,000 bytes, 22.35 GiB" in decimal.stderr
    text = run("mixtral-8x7b", "--vram", "24GB")
    assert "22.35 GiB card" in summary_line(text) and "24GB" not in text.stdout  # the plan says GiB
    assert info_json("mixtral-8x7b", "--vram", "12GiB", "--ram", "0")["host_experts"] == 0  # 0: none
