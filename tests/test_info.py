"""`offload info`: the memory plan, checked against bitsandbytes' own bytes and hand arithmetic."""

from __future__ import annotations

import json
import logging
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
from offload.quant import matrix_bytes
from tests.model_builder import WIDE, WINDOWED
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
# The runtime reserve on a card (offload.plan.runtime_reserve), its terms written out by hand.
RESERVE_BF16 = sum(mixtral_reserve_by_hand(4096, 256, quantized=False).values())  # 729,625,088: fused attention
RESERVE_NF4 = sum(mixtral_reserve_by_hand(4096, 256, quantized=True).values())  # + 112 MiB dequantized


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


@pytest.fixture(scope="module")
def bnb_nf4_expert() -> dict[str, int]:
    """One Mixtral expert quantized by bitsandbytes itself (nf4, blocksize 64): the raw sum of
    its tensors, and that sum laid out as a record is (each tensor and each matrix starting on a
    64-byte boundary, tensors in the documented order absmax, code, data). w1 and w3 share a
    shape, so w1's bytes count twice. Two real-size quantizations: 5-10 s on two busy cores."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    with warnings.catch_warnings():  # torch.jit deprecation noise from bitsandbytes' import
        warnings.simplefilter("ignore", DeprecationWarning)
        import bitsandbytes.functional as F

    generator = torch.Generator().manual_seed(0)
    raw = aligned = tensors = 0
    for shape, count in (((14336, 4096), 2), ((4096, 14336), 1)):  # w1 and w3, then w2
        weight = torch.randn(shape, generator=generator)  # fp32, as a checkpoint's weight upcast
        data, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=False)
        parts = [state.absmax, state.code, data]
        sizes = [t.numel() * t.element_size() for t in parts]
        end = 0
        for size in sizes:
            end = align_up(end, MATRIX_ALIGNMENT) + size
        raw += count * sum(sizes)
        aligned += count * align_up(end, MATRIX_ALIGNMENT)
        tensors += count * len(parts)
    return {"raw": raw, "aligned": aligned, "tensors": tensors}


def test_nf4_expert_is_what_bitsandbytes_produces(bnb_nf4_expert):
    out = info_json("mixtral-8x7b", "--expert-bits", "4")
    assert out["expert_format"] == "nf4"
    # The record holds exactly bitsandbytes' tensors, 64-byte aligned; the alignment adds less
    # than 64 bytes a tensor (for Mixtral's shapes nothing: every tensor is a multiple of 64).
    assert out["expert_bytes"] == bnb_nf4_expert["aligned"]
    assert 0 <= out["expert_bytes"] - bnb_nf4_expert["raw"] < 64 * bnb_nf4_expert["tensors"]
    assert out["expert_bytes"] == 99_090_624  # FACTS.md's measured figure
    assert out["experts_total"] == 256
    assert out["experts_total_bytes"] == 256 * out["expert_bytes"]


def test_bf16_sizes_by_hand():
    out = info_json("mixtral-8x7b", "--expert-bits", "16")
    assert (out["expert_format"], out["attn_format"], out["dtype"]) == ("bf16", "bf16", "bfloat16")
    assert out["expert_bytes"] == BF16_EXPERT == 352_321_536
    assert out["experts_total_bytes"] == 256 * BF16_EXPERT
    assert out["dense_bytes"] == BF16_DENSE == sum(out["dense_bytes_by_class"].values())
    assert out["kv_cache_bytes"] == KV_4096
    assert RESERVE_BF16 == 729_625_088 and out["reserve_bytes"] == RESERVE_BF16
    assert out["min_vram_bytes"] == BF16_DENSE + KV_4096 + 32 * 2 * BF16_EXPERT + RESERVE_BF16
    assert out["all_resident_vram_bytes"] == BF16_DENSE + KV_4096 + 256 * BF16_EXPERT + RESERVE_BF16
    assert out["vram_bytes"] is None and out["slots_per_layer"] == 2  # no card: the plan at the minimum
    assert out["estimate"] is None  # no budget, no profile: no speed to estimate


def test_12gib_card_with_32gib_ram_holds_4bit_mixtral_without_disk():
    args = ("mixtral-8x7b", "--vram", "12GiB", "--ram", "32GiB", "--expert-bits", "4")
    out = info_json(*args)
    record = RecordLayout.for_config(builtin_model("mixtral-8x7b")[1], "nf4").nbytes
    slots = (12 * GiB - BF16_DENSE - KV_4096 - RESERVE_NF4) // record  # 83.9 -> 83: 2 a layer, 19 spare
    assert out["device_experts"] == slots == 83 and sum(out["layer_slots"]) == 83
    assert out["slots_per_layer"] == 2 and sorted(set(out["layer_slots"])) == [2, 3]
    assert out["host_experts"] == 256 and out["disk_experts"] == 0
    assert out["host_bytes"] == 24 * GiB and out["host_raw_bytes"] == 256 * record  # pinned blocks, not 32 GiB
    assert out["device_bytes"] == BF16_DENSE + KV_4096 + 83 * record + RESERVE_NF4 <= 12 * GiB
    line = summary_line(run(*args))
    assert line.startswith("A 12 GiB card with a 32 GiB expert RAM budget holds Mixtral-8x7B")
    assert "2-3 of 8 experts per layer on the GPU (2.59 on average)" in line and "no disk reads" in line


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
    assert four["attn_format"] == "nf4"
    shapes = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096)]
    assert four["dense_bytes_by_class"]["attention"] == 32 * sum(matrix_bytes(s, "nf4") for s in shapes)
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
    [["--vram", "1GiB"], ["--vram", "10.1GiB", "--expert-bits", "4"]],
    ids=["bf16 on 1 GiB", "nf4 just under the minimum"],
)
def test_too_small_a_card_exits_2_naming_the_minimum(args):
    result = run("mixtral-8x7b", *args)
    assert result.exit_code == 2
    assert "minimum" in result.output and len(result.output.strip().splitlines()) == 1
    assert "Traceback" not in result.output


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


@pytest.mark.parametrize("profile", ["rtx-3060-12gb", "rtx-4090-24gb", "t4-16gb"])
def test_info_plans_mixtral_for_each_shipped_card(profile):
    """A shipped card's plan by hand: its plan.vram less dense weights (nf4 attention), KV cache
    and the runtime reserve (its dequantized-weight term is the nf4 expert's 112 MiB, larger than
    any attention matrix), in nf4 expert records; RAM holds all 256 in 24 GiB of pinned blocks."""
    from offload.profile import load_profile

    p = load_profile(profile)
    config = builtin_model("mixtral-8x7b")[1]
    record = RecordLayout.for_config(config, "nf4").nbytes
    dense = sum(dense_bytes_by_class(config, torch.bfloat16, "nf4").values())
    kv = kv_cache_bytes(config, p.context, torch.bfloat16)
    reserve = sum(mixtral_reserve_by_hand(p.context, 256, quantized=True, sdpa=p.sdpa).values())  # T4: math path
    slots = (p.plan_vram_bytes - dense - kv - reserve) // record
    out = info_json("mixtral-8x7b", "--profile", profile)
    assert (out["expert_format"], out["attn_format"], out["device_type"]) == ("nf4", "nf4", "cuda")
    assert out["device_experts"] == slots and out["slots_per_layer"] == slots // 32
    assert max(out["layer_slots"]) == slots // 32 + (slots % 32 > 0)
    assert out["disk_experts"] == 0 and out["host_bytes"] == 24 * GiB
    assert out["estimate"]["tokens_per_s"] > 0 and out["estimate"]["summary"].startswith("estimate: ")


def test_the_8_gb_card_no_longer_holds_mixtral():
    """The 4060's 7.4 GiB plan: top-2 nf4 experts per layer, dense weights and KV cache at
    context 1024 take 7.23 GiB, and the runtime reserve does not fit beside them."""
    result = run("mixtral-8x7b", "--profile", "rtx-4060-8gb")
    assert result.exit_code == 2 and "below the minimum" in result.output and "runtime reserve" in result.output


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
    assert (out["expert_format"], out["attn_format"], out["context"]) == ("nf4", "nf4", 4096)
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
    assert summary_line(result).startswith(f"A {gib} GiB card holds Mixtral-8x7B (nf4 experts)")


def test_explicit_bits_plan_what_they_say_without_a_profile():
    out = info_json("mixtral-8x7b", "--vram", "40GiB", "--expert-bits", "8")
    assert out["profile"] is None and out["expert_format"] == "int8" and out["attn_format"] == "bf16"


def test_an_8_gib_card_holds_mixtral_at_its_profiles_context():
    """With fused attention (no score matrix in the reserve) top-2 nf4 experts per layer, nf4
    attention, the KV cache at context 1024 and the reserve fit 8 GiB in prefill chunks of 128
    (780 MiB of reserve); at the default 256 the minimum is 8.01 GiB."""
    out = info_json("mixtral-8x7b", "--vram", "8GiB")
    assert out["profile"]["name"] == "rtx-4060-8gb" and out["profile"]["fits"] and out["context"] == 1024
    assert out["slots_per_layer"] == 2 and out["prefill_chunk"] == 128 and out["device_bytes"] <= 8 * GiB


def test_a_card_just_under_8_gib_is_refused_naming_the_flags_and_the_largest_context_that_fit():
    result = run("mixtral-8x7b", "--vram", "7.9GiB")
    assert result.exit_code == 2 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: --vram 7.90 GiB is below the minimum 7.96 GiB")
    assert "(prefill chunks of 16 tokens)" in line  # the least any chunk needs
    assert "profile rtx-4060-8gb (auto) fits at none of its widths, down to nf4 experts and nf4 attention at " \
           "context 1024" in line
    context = int(line.split("--context ")[1].split(" ")[0])
    assert "the largest that fits" in line and "or on --vram 7.97GiB or more" in line
    # the context it names fits, one more does not; the --vram it names fits
    fits = info_json("mixtral-8x7b", "--vram", "7.9GiB", "--context", str(context))
    assert fits["profile"]["name"] == "rtx-4060-8gb" and fits["device_bytes"] <= 7.9 * GiB
    assert fits["context"] == context and fits["min_vram_bytes"] <= 7.9 * GiB
    over = run("mixtral-8x7b", "--vram", "7.9GiB", "--context", str(context + 1))
    assert over.exit_code == 2 and "below the minimum" in over.stderr
    assert info_json("mixtral-8x7b", "--vram", "7.97GiB", "--context", "1024")["expert_format"] == "nf4"


def test_16_bit_experts_on_a_12_gib_card_suggest_4_bits():
    result = run("mixtral-8x7b", "--vram", "12GiB", "--expert-bits", "16")
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert "below the minimum 25.12 GiB" in line and "Mixtral-8x7B fits with --expert-bits 4, or on --vram 25.12GiB" in line
    assert "--context" not in line  # no context makes bf16 experts fit 12 GiB
    assert info_json("mixtral-8x7b", "--vram", "12GiB", "--expert-bits", "4")["device_bytes"] <= 12 * GiB
    nf4 = run("mixtral-8x7b", "--vram", "10.1GiB", "--expert-bits", "4")
    assert "fits with --attn-bits 8, or with --kv-bits 8" in nf4.stderr and "--context " in nf4.stderr  # widest first


def test_a_card_below_every_shipped_profile_plans_plain_defaults(model_dirs):
    out = info_json(str(model_dirs[WINDOWED.name]), "--vram", "1GiB")
    assert out["profile"]["name"] == "none" and not out["profile"]["fits"]
    assert "no shipped GPU profile fits a card of 1.00 GiB" in out["profile"]["reason"]
    assert out["expert_format"] == "bf16" and out["slots_per_layer"] == 8


def test_ram_is_called_the_expert_ram_budget_with_its_article():
    line = summary_line(run("mixtral-8x7b", "--vram", "12GiB", "--ram", "16GiB"))
    assert line.startswith("A 12 GiB card with a 16 GiB expert RAM budget holds Mixtral-8x7B (nf4 experts)")
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
