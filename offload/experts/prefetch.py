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
    """Predicts each next layer's experts during decode and asks the cache to load them.

    With ``lookahead``, the next layer's top-``width`` experts by gate look-ahead are loaded.
    With ``history`` (a predictor and its ``PrefetchPolicy`` from predict.py), the predictor
    observes every layer's choice (before the cache serves it, so score-based eviction sees
    it) and the policy's picks for the next layer are loaded.
    """

    def __init__(self, cache, lookahead: Lookahead | None = None, width: int = 0, history=None, spec=None):
        self.cache = cache
        self.num_layers = cache.num_layers
        self.lookahead = lookahead
        self.width = width  # look-ahead: experts prefetched per layer at most
        self.history = history  # a predict.Predictor, or None
        self.spec = spec  # its predict.PrefetchPolicy
        self.predicted: dict[int, list[int]] = {}  # layer -> experts predicted for the current token
        self._prompt: list[list[list[int]]] = []  # prefill routing, layer-major, replayed per token

    def begin_token(self) -> None:
        self.predicted = {}
        if self.history is not None:
            self.history.begin_token()

    def reset(self) -> None:
        """A new sequence: short-term history goes, long-run statistics stay."""
        if self.history is not None:
            self.history.reset()

    def before_moe(self, layer: int, hidden: torch.Tensor, chosen: torch.Tensor) -> None:
        """Layer ``layer`` has routed ``chosen`` [T, K] from ``hidden`` [T, D]; prefetch for the
        next layer (decode only: a prompt asks for nearly every expert anyway)."""
        if hidden.shape[0] != 1:
            if self.history is not None:
                self._learn_prompt(layer, chosen)
            return
        if self.history is not None:
            self.history.observe(layer, chosen[0].tolist())
        nxt = layer + 1
        if nxt >= self.num_layers:
            return
        picks: list[int] = []
        if self.lookahead is not None:
            scores = self.lookahead.scores(nxt, hidden)
            picks = sorted(scores, key=lambda e: (-scores[e], e))[: self.width]
        if self.history is not None:
            from offload.experts.predict import select_prefetch

            resident = set(self.cache.resident(nxt))
            picks += sorted(
                select_prefetch(
                    self.history.scores(nxt),
                    resident,
                    self.cache.max_experts_per_call,
                    self.spec.threshold,
                    self.spec.max_prefetch,
                    self.cache.policy.last_use[nxt],
                )
            )
        self.predicted[nxt] = picks
        if picks:
            self.cache.prefetch(nxt, picks)

    def _learn_prompt(self, layer: int, chosen: torch.Tensor) -> None:
        """A prompt arrives layer by layer; once its last layer has routed, the history learns
        it token by token, in the order decode will feed it, so the first generated token
        already has statistics."""
        self._prompt.append(chosen.tolist())  # [T][K] for this layer
        if layer < self.num_layers - 1:
            return
        for t in range(len(self._prompt[0])):
            self.history.begin_token()
            for routed_layer, rows in enumerate(self._prompt):
                self.history.observe(routed_layer, rows[t])
        self._prompt = []
