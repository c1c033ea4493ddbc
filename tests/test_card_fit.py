"""offload.profile_fit's card_fit (the plan `offload info --vram` shows: the shipped profile for a card
of that size, fitted), fit_hints (the flags that would make a plan fit), and a --ram flag that
leaves misses to the disk, checked against plan_model's own minimum."""

from __future__ import annotations

import pytest
import torch

from offload import quant
from offload.plan import builtin_model, plan_model
from offload.profile import load_profile
from offload.profile_fit import card_fit, fit_hints, fit_profile
from tests.test_kv_plan import NF4_DQ_EXPERT, dense_by_hand, nf4_dq_matrix
from tests.test_plan import mixtral_reserve_by_hand

GiB, MiB = 2**30, 2**20
# Mixtral-8x7B's dense weights on a card at 4-bit (nf4-dq) attention, by hand: all of them less the
# 250 MiB bf16 input embeddings, which stay in host RAM (lm_head is untied)
DEVICE_DENSE_4BIT = dense_by_hand(nf4_dq_matrix) - 32000 * 4096 * 2


def kv_by_hand(context: int, bits: int = 16) -> int:
    """Mixtral-8x7B's KV cache: 32 layers, 8 KV heads of 128, K and V; bf16, or int8 and a bf16 scale."""
    return 2 * 32 * 8 * context * (128 * 2 if bits == 16 else 128 + 2)


def mixtral():
    return builtin_model("mixtral-8x7b")


@pytest.mark.parametrize("gib, name", [(8, "rtx-4060-8gb"), (12, "rtx-3060-12gb"), (16, "t4-16gb"), (24, "rtx-4090-24gb"),
                                       (80, "rtx-4090-24gb")])
def test_card_fit_takes_the_shipped_profile_for_that_card(gib, name):
    model, config = mixtral()
    shipped, fitted, why = card_fit(config, gib * GiB, model_name=model)
    assert shipped.name == name
    if gib == 8:  # at the profile's context 1024, the default chunk of 256: 74 nf4-dq slots in 8 GiB
        reserve = sum(mixtral_reserve_by_hand(1024, 256, quantized=True).values())
        slots = (8 * GiB - DEVICE_DENSE_4BIT - kv_by_hand(1024) - reserve) // NF4_DQ_EXPERT
        assert slots == 74 and f"{slots / 32:.2f}" == "2.31"
        assert (fitted.expert_bits, fitted.attn_bits, fitted.plan_vram, fitted.context) == (4, 4, "8GiB", 1024)
        assert "2-3/8 experts per layer on the device (2.31 on average)" in why
    elif gib == 24:  # every nf4-dq expert on the card, with the dense weights, the KV cache and the reserve
        reserve = sum(mixtral_reserve_by_hand(4096, 256, quantized=True).values())
        resident = DEVICE_DENSE_4BIT + kv_by_hand(4096) + 256 * NF4_DQ_EXPERT + reserve
        assert resident == 25_522_467_840 <= 24 * GiB  # 23.77 GiB
        assert (fitted.expert_bits, fitted.attn_bits, fitted.plan_vram) == (4, 4, None)
        assert why == "the shipped profile for a 24 GiB card; 4-bit weights, every expert resident, no budget"
    elif gib == 80:  # every 8-bit expert on the card: no budget, as a plain run
        assert (fitted.expert_bits, fitted.plan_vram) == (8, None) and "every expert resident" in why
    else:
        assert (fitted.expert_bits, fitted.attn_bits, fitted.plan_vram) == (4, 4, f"{gib}GiB")
        assert why.startswith(f"the shipped profile for a {gib} GiB card; 4-bit weights, ")


def test_card_fit_below_every_shipped_card_says_plain_defaults():
    shipped, fitted, why = card_fit(mixtral()[1], 4 * GiB)
    assert shipped is None and fitted is None and why.endswith("; plain defaults")


def test_a_ram_flag_may_leave_misses_to_the_disk():
    """Without --ram the fit wants every expert in RAM; a --ram the user gives is their budget."""
    model, config = mixtral()
    profile = load_profile("rtx-3060-12gb")
    with pytest.raises(Exception, match="plan.ram"):
        fit_profile(profile, config, model_name=model, machine={"vram": 12 * GiB, "ram": 16 * GiB})
    fitted, why = fit_profile(profile, config, model_name=model, ram=16 * GiB,
                              machine={"vram": 12 * GiB, "ram": 16 * GiB})
    assert fitted.expert_bits == 4 and fitted.plan_ram == "16GiB" and "in RAM, the rest read from disk" in why


def _min_vram(config, context, experts, attention):
    """The least a --vram may be: the plan's minimum at the smallest prefill chunk it fits down to."""
    return plan_model("m", config, torch.bfloat16, context, experts, attention, prefill_tokens=16).min_vram


def test_fit_hints_name_the_largest_context_that_fits():
    """4-bit weights (nf4-dq, the narrowest) at context 1024 need 7.09 GiB by hand (dense on the
    card, KV, top-2 records a layer, the reserve in chunks of 16); a 7 GiB card is 96 MiB short."""
    model, config = mixtral()
    four = quant.get_format("nf4-dq")
    card = 7 * GiB
    need = DEVICE_DENSE_4BIT + kv_by_hand(1024) + 64 * NF4_DQ_EXPERT + sum(mixtral_reserve_by_hand(1024, 16, True).values())
    assert need == _min_vram(config, 1024, four, four) == 7_616_879_616 > card
    hints = fit_hints(model, config, torch.bfloat16, 1024, four, four, card)
    context = int(hints.split("--context ")[1].split(" ")[0])
    assert _min_vram(config, context, four, four) <= card < _min_vram(config, context + 1, four, four)
    assert f"--vram {-(-need * 100 // GiB) / 100:g}GiB or more" in hints
    assert "--expert-bits" not in hints and "--attn-bits" not in hints  # nothing narrower than 4 bits
    # --kv-bits 8 saves 63 MiB of cache at context 1024 but its reserve reads the keys and values back
    # (one bf16 [16, 1024, 128], 4 MiB) and quantizes a chunk of 16 (352 KiB): 58.66 MiB, short of 96
    saved = kv_by_hand(1024) - kv_by_hand(1024, 8) - (2 * 8 * 1024 * 128 * 2 + 2 * 8 * 16 * 128 * 11)
    assert saved < need - card and "--kv-bits 8" not in hints
    assert fit_hints(model, config, torch.bfloat16, 1024, four, four, 8 * GiB) == ""  # it fits: nothing to say


def test_fit_hints_take_the_widest_narrower_weights_that_fit():
    model, config = mixtral()
    bf16, nf4 = quant.get_format("bf16"), quant.get_format("nf4")
    hints = fit_hints(model, config, torch.bfloat16, 4096, bf16, bf16, 12 * GiB)
    assert hints.startswith(f"{model} fits with --expert-bits 4, or on --vram ")  # 8-bit experts need 15 GiB
    assert _min_vram(config, 4096, nf4, bf16) <= 12 * GiB
    fixed = fit_hints(model, config, torch.bfloat16, 4096, bf16, bf16, 12 * GiB, experts_fixed=True)
    assert "--expert-bits" not in fixed  # a pack's experts: only a convert changes them
