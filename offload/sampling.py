"""Next-token selection: greedy, temperature, top-k, top-p and repetition penalty, seeded.

What it is: a pure function of logits, the token history and a seeded generator, so that the
same seed gives the same tokens on any device (sampling runs on CPU in fp32). What it is not:
the decode loop, which lives in the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from offload.errors import SettingError


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off; >1 discourages tokens already seen
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and self.temperature < float("inf")):
            raise SettingError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise SettingError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise SettingError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise SettingError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

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
            seen = history.cpu().unique()
            picked = scores[seen]
            scores[seen] = torch.where(picked < 0, picked * s.repetition_penalty, picked / s.repetition_penalty)
        if s.greedy:
            return int(torch.argmax(scores))
        scores = scores / s.temperature
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
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
