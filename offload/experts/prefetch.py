"""Prefetch during decode: guess the coming layers' experts and start loading them early.

What it is: the glue between the model's forward pass and the expert cache. After layer L's
router has chosen, and before layer L's experts run, ``Prefetcher.routed`` asks its
predictors about layers L+1 .. L+depth and starts loading the best guesses (on the copy stream
on CUDA, on the loader thread on CPU), so the loads overlap layer L's expert compute.
``Lookahead`` is the gate look-ahead predictor: the routers of the coming layers applied to the
current hidden state (after layer L's attention), which is usually close to the state those
routers will see. What it is not: a policy for eviction (policy.py) or history statistics
(predict.py). A wrong guess costs bytes and a slot, never correctness.

Shape legend: T = tokens in the forward call, D = hidden, E = experts, L = layers, d = depth.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from offload.config import ModelConfig
from offload.model import DenseWeights


class Lookahead:
    """Gate look-ahead: the top experts of layers L+1 .. L+depth from layer L's hidden state.

    Each layer's router is folded with its post-attention norm weight once (router * norm
    weight, [E, D]). The norm's other factor, 1 / rms(hidden), is one positive number for all
    of a token's logits, so it cannot change their order and is left out: looking several
    layers ahead is one matmul, one top-k and one host copy per decode step.
    """

    name = "lookahead"

    def __init__(self, config: ModelConfig, dense: DenseWeights, depth: int = 1):
        self.depth = depth
        self.num_layers = config.num_moe_layers  # expert layers: dense-MLP layers have no router
        self.num_experts = config.num_local_experts
        # [L * E, D]: each expert layer's router rows scaled by its post-attention norm weight
        self.folded = torch.cat([lw.router * lw.post_attention_layernorm for lw in dense.layers if lw.router is not None])

    def device_top(self, layer: int, hidden: torch.Tensor, width: int) -> torch.Tensor | None:
        """hidden [1, D] after ``layer``'s attention -> the ``width`` best experts of each of the
        next ``depth`` layers that exist, [d, width] int64 on the device, best first (None when
        ``layer`` is the last). Queued only: the caller reads it with the layer's routing."""
        first, last = layer + 1, min(layer + self.depth, self.num_layers - 1)
        if first > last:
            return None
        E = self.num_experts
        routers = self.folded[first * E : (last + 1) * E]  # [d * E, D]
        last_row = hidden if hidden.shape[0] == 1 else hidden[-1:]  # [1, D]
        logits = F.linear(last_row, routers).view(-1, E)  # [d, E], unnormalised: same order
        return torch.topk(logits, width, dim=-1).indices  # [d, width]

    def top(self, layer: int, hidden: torch.Tensor, width: int) -> dict[int, list[int]]:
        """hidden [T, D] (the last row is used) -> {coming layer: its ``width`` best experts}."""
        picks = self.device_top(layer, hidden, width)
        return {} if picks is None else {layer + 1 + i: row for i, row in enumerate(picks.tolist())}


class Prefetcher:
    """Predicts the coming layers' experts during decode and asks the cache to load them.

    With ``lookahead``, the top-``width`` experts of each of the next ``lookahead.depth`` layers
    by gate look-ahead are loaded. With ``history`` (a predictor and its ``PrefetchPolicy`` from
    predict.py), the predictor observes every layer's choice (before the cache serves it, so
    score-based eviction sees it) and the policy's picks for the next layer are loaded.
    """

    def __init__(
        self, cache, lookahead: Lookahead | None = None, width: int = 0, history=None, spec=None, defer=False
    ):
        self.cache = cache
        # CUDA: the host work of choosing and starting prefetches waits until layer L's experts
        # are queued (``after_moe``), so the GPU computes while the host decides; the copies
        # still overlap that compute. CPU (compute is the host): start them before it.
        self.defer = defer
        self._pending: tuple[int, dict[int, list[int]]] | None = None
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
        """A new sequence, or a pass abandoned half-way (a Ctrl+C): short-term history goes, and
        so do the layers of a prompt pass gathered so far and a deferred prefetch; long-run
        statistics stay."""
        if self.history is not None:
            self.history.reset()
        self._prompt = []
        self._pending = None

    def device_picks(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """Decode: queue the gate look-ahead for the layers after ``layer`` from ``hidden``
        [1, D] (after its attention); [d, width] on the device, or None. The model reads it to
        the host together with the layer's routing (one copy) and hands both to ``routed``."""
        if self.lookahead is None or layer + 1 >= self.num_layers:
            return None
        return self.lookahead.device_top(layer, hidden, self.width)

    def routed(self, layer: int, chosen: list[int], picks: list[list[int]] | None) -> None:
        """Decode: layer ``layer`` chose ``chosen`` (host ids), and the look-ahead picked
        ``picks`` (rows for layers ``layer+1 ..``); prefetch for the coming layers, now (CPU)
        or once the layer's experts are queued (``defer``, CUDA)."""
        if self.history is not None:
            self.history.observe(layer, chosen)
        if layer + 1 >= self.num_layers:
            return
        ahead = {layer + 1 + i: row for i, row in enumerate(picks)} if picks else {}
        if self.defer:
            self._pending = (layer, ahead)
        else:
            self._issue(layer, ahead)

    def prompt_routed(self, layer: int, chosen: torch.Tensor) -> None:
        """A prompt's layer has routed ``chosen`` [T, K]: nothing is prefetched (a prompt asks
        for nearly every expert anyway), but the history learns it (``_learn_prompt``)."""
        if self.history is not None:
            self._learn_prompt(layer, chosen)

    def before_moe(self, layer: int, hidden: torch.Tensor, chosen: torch.Tensor) -> None:
        """``device_picks`` + ``routed`` (or ``prompt_routed``) from device tensors: hidden
        [T, D], chosen [T, K]. For callers outside the model's decode step."""
        if hidden.shape[0] != 1:
            self.prompt_routed(layer, chosen)
            return
        ahead = self.device_picks(layer, hidden)
        self.routed(layer, chosen[0].tolist(), None if ahead is None else ahead.tolist())

    def after_moe(self, layer: int) -> None:
        """Layer ``layer``'s experts are queued: start the prefetches ``routed`` deferred."""
        if self._pending is not None and self._pending[0] == layer:
            self._issue(*self._pending)
        self._pending = None

    def _issue(self, layer: int, picks: dict[int, list[int]]) -> None:
        """Add the history policy's picks for the next layer and start every load."""
        if self.history is not None:
            from offload.experts.predict import select_prefetch

            nxt = layer + 1
            guessed = select_prefetch(
                self.history.scores(nxt),
                set(self.cache.where[nxt]),
                self.cache.capacity[nxt],
                self.spec.threshold,
                self.spec.max_prefetch,
                self.cache.policy.last_use[nxt],
            )
            picks[nxt] = picks.get(nxt, []) + sorted(guessed)
        for target in sorted(picks):  # nearest layer first: it is needed soonest
            experts = picks[target]
            seen = self.predicted.setdefault(target, [])
            seen.extend(e for e in experts if e not in seen)
            if experts:
                self.cache.prefetch(target, experts)

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
