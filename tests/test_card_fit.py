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

GiB = 2**30


def mixtral():
    return builtin_model("mixtral-8x7b")


@pytest.mark.parametrize("gib, name", [(8, "rtx-4060-8gb"), (12, "rtx-3060-12gb"), (16, "t4-16gb"), (24, "rtx-4090-24gb"),
                                       (80, "rtx-4090-24gb")])
def test_card_fit_takes_the_shipped_profile_for_that_card(gib, name):
    model, config = mixtral()
    shipped, fitted, why = card_fit(config, gib * GiB, model_name=model)
    assert shipped.name == name
    if gib == 8:  # top-2 nf4 experts and the reserve take 7.99 GiB at the profile's context 1024 (chunks of 128)
        assert (fitted.expert_bits, fitted.attn_bits, fitted.plan_vram) == (4, 4, "8GiB")
        assert "2/8 experts per layer on the device" in why
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
    model, config = mixtral()
    nf4 = quant.get_format("nf4")
    card = int(7.9 * GiB)
    hints = fit_hints(model, config, torch.bfloat16, 1024, nf4, nf4, card)
    context = int(hints.split("--context ")[1].split(" ")[0])
    assert _min_vram(config, context, nf4, nf4) <= card < _min_vram(config, context + 1, nf4, nf4)
    need = _min_vram(config, 1024, nf4, nf4)
    assert f"--vram {-(-need * 100 // GiB) / 100:g}GiB or more" in hints
    assert "--expert-bits" not in hints and "--attn-bits" not in hints  # nothing narrower than nf4
    assert "--kv-bits 8" not in hints  # it saves 59 MiB at context 1024 (63 MiB of cache, 4 MiB more reserve); 65 are missing
    assert fit_hints(model, config, torch.bfloat16, 1024, nf4, nf4, 8 * GiB) == ""  # it fits: nothing to say


def test_fit_hints_take_the_widest_narrower_weights_that_fit():
    model, config = mixtral()
    bf16, nf4 = quant.get_format("bf16"), quant.get_format("nf4")
    hints = fit_hints(model, config, torch.bfloat16, 4096, bf16, bf16, 12 * GiB)
    assert hints.startswith(f"{model} fits with --expert-bits 4, or on --vram ")  # 8-bit experts need 15 GiB
    assert _min_vram(config, 4096, nf4, bf16) <= 12 * GiB
    fixed = fit_hints(model, config, torch.bfloat16, 4096, bf16, bf16, 12 * GiB, experts_fixed=True)
    assert "--expert-bits" not in fixed  # a pack's experts: only a convert changes them
