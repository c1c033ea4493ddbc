"""The sampler against hand-computed expectations."""

from __future__ import annotations

import pytest
import torch

from offload.errors import SettingError
from offload.sampling import Sampler, SamplingSettings

NO_HISTORY = torch.tensor([], dtype=torch.int64)


def test_greedy_is_argmax():
    logits = torch.tensor([0.1, 3.0, -2.0, 2.9])
    assert Sampler(SamplingSettings())(logits, NO_HISTORY) == 1


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    # seen tokens 0 and 3: 2.0 -> 1.0 and 1.9 -> 0.95; unseen 2 stays 1.2 and wins.
    logits = torch.tensor([2.0, -1.0, 1.2, 1.9])
    sampler = Sampler(SamplingSettings(repetition_penalty=2.0))
    assert sampler(logits, torch.tensor([0, 3, 3])) == 2
    # a seen negative logit is pushed further down: -0.5 * 2 = -1.0 < unseen -0.8
    logits = torch.tensor([-0.5, -0.8])
    assert sampler(logits, torch.tensor([0])) == 1


def test_top_k_one_is_greedy_at_any_temperature():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    sampler = Sampler(SamplingSettings(temperature=5.0, top_k=1, seed=1))
    assert {sampler(logits, NO_HISTORY) for _ in range(50)} == {int(logits.argmax())}


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    seen = {Sampler(SamplingSettings(temperature=1.0, top_p=0.7, seed=s))(logits, NO_HISTORY) for s in range(200)}
    assert seen == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    seen = {Sampler(SamplingSettings(temperature=1.0, top_p=0.5, seed=s))(logits, NO_HISTORY) for s in range(100)}
    assert seen == {0}


def test_temperature_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    sampler = Sampler(SamplingSettings(temperature=1.0, seed=123))
    draws = torch.tensor([sampler(probs.log(), NO_HISTORY) for _ in range(3000)])
    freq = torch.bincount(draws, minlength=3).float() / len(draws)
    assert torch.allclose(freq, probs, atol=0.03), freq


def test_same_seed_same_draws_and_temperature_sharpens():
    logits = torch.randn(100, generator=torch.Generator().manual_seed(2))
    a = Sampler(SamplingSettings(temperature=1.0, seed=7))
    b = Sampler(SamplingSettings(temperature=1.0, seed=7))
    assert [a(logits, NO_HISTORY) for _ in range(20)] == [b(logits, NO_HISTORY) for _ in range(20)]
    cold = Sampler(SamplingSettings(temperature=0.05, seed=7))
    hits = sum(cold(logits, NO_HISTORY) == int(logits.argmax()) for _ in range(100))
    assert hits >= 95


def draws(settings: SamplingSettings, logits: torch.Tensor, n: int) -> torch.Tensor:
    sampler = Sampler(settings)
    return torch.tensor([sampler(logits, NO_HISTORY) for _ in range(n)])


def test_min_p_keeps_tokens_within_a_share_of_the_best():
    # p = 0.5, 0.3, 0.15, 0.05: min_p 0.4 keeps p >= 0.2 (tokens 0, 1), renormalised to 5/8, 3/8;
    # min_p 0.25 keeps p >= 0.125 (0, 1, 2), renormalised 0.5/0.95, 0.3/0.95, 0.15/0.95
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    two = draws(SamplingSettings(temperature=1.0, min_p=0.4, seed=3), probs.log(), 4000)
    freq = torch.bincount(two, minlength=4).float() / len(two)
    assert set(two.tolist()) == {0, 1}
    assert torch.allclose(freq, torch.tensor([5 / 8, 3 / 8, 0.0, 0.0]), atol=0.03), freq
    three = draws(SamplingSettings(temperature=1.0, min_p=0.25, seed=4), probs.log(), 4000)
    freq = torch.bincount(three, minlength=4).float() / len(three)
    assert set(three.tolist()) == {0, 1, 2}
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95, atol=0.03), freq
    assert set(draws(SamplingSettings(temperature=1.0, min_p=0.0, seed=5), probs.log(), 600).tolist()) == {0, 1, 2, 3}
    assert set(draws(SamplingSettings(temperature=1.0, min_p=1.0, seed=6), probs.log(), 100).tolist()) == {0}


def test_min_p_works_on_the_tempered_distribution_after_top_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    # temperature 0.5 squares the odds: p ~ 0.25, 0.09, 0.0225, 0.0025 (/ their sum); token 2's share
    # of the best is 0.09, so min_p 0.2 drops it, though at temperature 1 (share 0.3) it would stay
    seen = set(draws(SamplingSettings(temperature=0.5, min_p=0.2, seed=7), probs.log(), 600).tolist())
    assert seen == {0, 1}
    # top-p 0.9 keeps tokens 0, 1, 2; then min_p 0.4 (p >= 0.2) drops 2; top-k 3 with min_p 0.25 keeps 0-2
    seen = set(draws(SamplingSettings(temperature=1.0, top_p=0.9, min_p=0.4, seed=8), probs.log(), 600).tolist())
    assert seen == {0, 1}
    seen = set(draws(SamplingSettings(temperature=1.0, top_k=3, min_p=0.25, seed=9), probs.log(), 1500).tolist())
    assert seen == {0, 1, 2}


@pytest.mark.parametrize(
    "kwargs",
    [{"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -2}, {"repetition_penalty": 0.0},
     {"min_p": -0.1}, {"min_p": 1.5}, {"min_p": float("nan")}],
)
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(SettingError):
        SamplingSettings(**kwargs)
