"""Prefetch during decode: guess the next layer's experts and start loading them early.

What it is: the glue between the model's forward pass and the expert cache. After layer L's
router has chosen, and before layer L's experts run, ``Prefetcher.before_moe`` asks its
predictors for layer L+1 and starts loading the best guesses on the copy stream, so the copy
overlaps layer L's expert compute. ``Lookahead`` is the gate look-ahead predictor: layer L+1's
router applied to the current hidden state (after layer L's attention), which is usually close
to the state layer L+1's router will see. What it is not: a policy for eviction (policy.py) or
history statistics (predict.py). A wrong guess costs bytes and a slot, never correctness.

Shape legend: T = tokens in the forward call, D = hidden, E = experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from offload.config import ModelConfig
from offload.model import DenseWeights, rms_norm


class Lookahead:
    """Gate look-ahead: scores for layer L+1 from layer L's hidden state."""

    name = "lookahead"

    def __init__(self, config: ModelConfig, dense: DenseWeights):
        self.config = config
        self.dense = dense

    def scores(self, layer: int, hidden: torch.Tensor) -> dict[int, float]:
        """hidden [T, D] (the last row is used) -> expert -> router probability at ``layer``."""
        lw = self.dense.layers[layer]
        x = rms_norm(hidden[-1:], lw.post_attention_layernorm, self.config.rms_norm_eps)  # [1, D]
        probs = torch.softmax(F.linear(x, lw.router).float(), dim=-1)[0]  # [E]
        return dict(enumerate(probs.cpu().tolist()))


class Prefetcher:
    """Predicts each next layer's experts during decode and asks the cache to load them."""

    def __init__(self, cache, lookahead: Lookahead | None, width: int):
        self.cache = cache
        self.num_layers = cache.num_layers
        self.lookahead = lookahead
        self.width = width  # experts prefetched per layer at most
        self.predicted: dict[int, list[int]] = {}  # layer -> experts predicted for the current token

    def begin_token(self) -> None:
        self.predicted = {}

    def before_moe(self, layer: int, hidden: torch.Tensor, chosen: torch.Tensor) -> None:
        """Layer ``layer`` has routed ``chosen`` [T, K] from ``hidden`` [T, D]; prefetch for the
        next layer (decode only: a prompt asks for nearly every expert anyway)."""
        nxt = layer + 1
        if hidden.shape[0] != 1 or nxt >= self.num_layers:
            return
        scores = self.lookahead.scores(nxt, hidden) if self.lookahead is not None else {}
        picks = self.choose(scores)
        self.predicted[nxt] = picks
        self.cache.prefetch(nxt, picks)

    def choose(self, scores: dict[int, float]) -> list[int]:
        ranked = sorted(scores, key=lambda e: (-scores[e], e))
        return ranked[: self.width]
