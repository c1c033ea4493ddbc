"""Next-token selection: greedy, temperature, top-k, top-p, min-p and repetition penalty, seeded.

What it is: a pure function of logits, the token history and a seeded generator, so that the
same seed gives the same tokens on any device (sampling runs on CPU in fp32). What it is not:
the decode loop, which lives in the engine.

The order: repetition penalty, temperature, then the filters in llama.cpp's order, top-k, top-p,
min-p, each on what the one before left; then a draw. min-p keeps the tokens whose probability
is at least ``min_p`` times the most likely token's (llama.cpp's and transformers' rule), on the
distribution being sampled (after temperature, as top-p).

Settings are checked when made: a temperature and repetition penalty must be finite, min-p in
[0, 1], a seed an
integer a torch generator takes ([-2^63, 2^64 - 1]). Scores that the penalty or the temperature
push out of float range (a temperature of 1e-320, say) never reach the softmax as inf or NaN:
they are redone in float64 relative to the best score, which is the limit the distribution
tends to (the best tokens share the mass, as greedy picks among them). Logits that hold NaN are
an OffloadError.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from offload.errors import OffloadError, SettingError

# What torch.Generator.manual_seed takes.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off; >1 discourages tokens already seen
    seed: int | None = None
    min_p: float = 0.0  # 0 = off; keep tokens with probability >= min_p * the top token's

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and self.temperature < float("inf")):
            raise SettingError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise SettingError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise SettingError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise SettingError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0 < self.repetition_penalty < float("inf"):
            raise SettingError(f"repetition_penalty must be > 0 and finite, got {self.repetition_penalty}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not SEED_MIN <= self.seed <= SEED_MAX):
            raise SettingError(f"seed {self.seed} is outside the range a random generator takes, "
                               f"[{SEED_MIN}, {SEED_MAX}] (-2^63 to 2^64 - 1)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Chooses tokens under one ``SamplingSettings``; owns the seeded random generator."""

    def __init__(self, settings: SamplingSettings):
        self.settings = settings
        self.generator = torch.Generator(device="cpu")
        if settings.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(settings.seed)

    def __call__(self, logits: torch.Tensor, history: torch.Tensor) -> int:
        """logits [V] (any device, any dtype), history [N] int64 ids seen so far -> token id."""
        s = self.settings
        if s.greedy and s.repetition_penalty == 1.0:  # one small device -> host read, not [V] floats
            return int(torch.argmax(logits))  # the first of equal maxima, as on the CPU copy below
        scores = logits.detach().float().cpu()  # [V]
        if s.repetition_penalty != 1.0 and history.numel():
            if not 0 < float(torch.tensor(s.repetition_penalty, dtype=torch.float32)) < float("inf"):
                scores = scores.double()  # a penalty out of fp32's range: 0 / 0 and 0 * inf would be NaN
            seen = history.cpu().unique()
            picked = scores[seen]
            scores[seen] = torch.where(picked < 0, picked * s.repetition_penalty, picked / s.repetition_penalty)
        if s.greedy:
            return int(torch.argmax(scores))
        scaled = scores / s.temperature
        if not bool(torch.isfinite(scaled.max())):  # NaN, +inf, or every score -inf
            scaled = _scaled_safely(scores, s.temperature)
        scores = scaled
        if s.top_k and s.top_k < scores.numel():
            kth = torch.topk(scores, s.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if s.top_p < 1.0:
            sorted_scores, sorted_ids = torch.sort(scores, descending=True)  # [V]
            cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
            # drop a token once the tokens ranked above it already hold top_p of the mass
            drop = (cumulative - torch.softmax(sorted_scores, dim=-1)) >= s.top_p
            drop[0] = False
            scores[sorted_ids[drop]] = float("-inf")
        if s.min_p > 0.0:
            # p_i >= min_p * p_max  <=>  score_i >= score_max + log(min_p): the softmax's shared
            # normaliser cancels, and the best token always stays
            floor = scores.max() + math.log(s.min_p)
            scores = scores.masked_fill(scores < floor, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def _scaled_safely(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """``scores / temperature`` where that leaves float range: in float64, relative to the best
    score, so that the best tokens get 0 and the rest a finite or -inf score (never NaN or +inf).
    Scores already +inf (a penalty that divided by a tiny number) are the best, scores all -inf
    (a penalty that overflowed them all) tie; NaN is refused."""
    wide = scores.double()
    if bool(torch.isnan(wide).any()):
        raise OffloadError("sampling: the logits hold NaN (damaged weights, or a value out of range)")
    top = wide.max()
    if top == float("inf"):
        wide = torch.where(wide == top, 0.0, float("-inf"))
    elif top == float("-inf"):  # a penalty overflowed every score: they all tie
        wide = torch.zeros_like(wide)
    else:
        wide = (wide - top) / temperature
    return wide.float()
