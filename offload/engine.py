"""Engine: a model loaded onto a device, with prefill, decode and generate.

What it is: ``Engine.load`` (checks every input, then builds the weights through loader.py and,
under a memory budget, the expert cache with its policy and prefetcher) and the forward steps;
``generate`` returns a ``Generation`` (generation.py). What it is not: a command-line tool (it
never prints) or a chat session (it takes token ids; formats live in the tokenizer).

The engine keeps the token sequence whose keys and values its KV cache holds (``sequence``), so
a caller that sends the same conversation again with more at the end (a chat, a server) can keep
the longest common prefix and prefill only the rest (``keep_prefix``, then ``extend``; or
``prefill(ids, reuse=True)``; or ``GenerationSettings(reuse_prefix=True)``). Prompt chunks are
aligned to positions (multiples of ``prefill_chunk``), so a prefill that starts at a multiple of
the chunk size runs exactly the chunks a whole prefill runs, bit for bit. With a sliding window
shorter than the context the KV cache is a ring (``offload.model.kv_capacity``): a held prefix is
reused only while the keys its next position attends to are still in the ring, else the prompt
is prefilled whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from offload.checkpoint import Checkpoint
from offload.config import ModelConfig
from offload.device import is_cuda, memory_info, resolve_device, sdpa_path
from offload.errors import BudgetError, SettingError, TokenizerError
from offload.experts.cache import CPU_EXPERTS, ExpertCache
from offload.experts.policy import DEFAULT_POLICY, REPLAY_POLICY, cache_policy
from offload.experts.predict import PREFETCH_POLICIES, ScoreEviction
from offload.experts.prefetch import Lookahead, Prefetcher
from offload.experts.tiers import CheckpointRecords
from offload.generation import (
    Generation,
    GenerationSettings,
    GenerationStats,
    PrefillInterrupted,
    StopMatcher,
    TokenEvent,
)
from offload.hub import resolve_model
from offload.loader import (
    DEFAULT_CONTEXT,
    DEFAULT_DTYPE,
    DTYPES,
    ProgressFn,
    ResidentExperts,
    load_dense,
    load_resident_experts,
    parse_dtype,
    spare_ram,
    weight_formats,
)
from offload.model import DenseWeights, KVCache, MixtralModel, RotaryTable, fuse_qkv, kv_capacity, kv_cache_nbytes
from offload.pack import Pack, is_pack
from offload.plan import (
    PREFILL_CHUNK_TOKENS,
    MemoryPlan,
    check_kv_bits,
    dense_bytes_by_class,
    device_dense_bytes,
    fit_to_free,
    format_bytes,
    parse_bytes,
    plan_memory,
)
from offload.quant import get_format
from offload.tokenizer import Tokenizer

# The engine's public API, in one place for callers (the CLI, benchmarks, tests).
__all__ = [
    "DEFAULT_CONTEXT",
    "DEFAULT_DTYPE",
    "DTYPES",
    "Engine",
    "Generation",
    "GenerationSettings",
    "GenerationStats",
    "PrefillInterrupted",
    "StopMatcher",
    "TokenEvent",
    "parse_dtype",
]


class Engine:
    """A loaded model on one device, ready to generate."""

    def __init__(
        self,
        config: ModelConfig,
        tokenizer: Tokenizer,
        dense: DenseWeights,
        experts: ResidentExperts | ExpertCache,
        device: torch.device,
        dtype: torch.dtype,
        context_length: int,
        plan: MemoryPlan | None = None,
        source: Checkpoint | Pack | None = None,
        kv_cache: KVCache | None = None,
        kv_bits: int = 16,
        prefill_chunk: int = PREFILL_CHUNK_TOKENS,
    ):
        self.config = config
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.context_length = context_length
        self.plan = plan  # None when every expert is resident (no cache)
        self.model_name = ""  # set by load: the path it came from
        self.policy = ""  # set by load: the --policy name when the cache is on
        self.cache = experts if isinstance(experts, ExpertCache) else None
        self._source = source  # kept open while the cache reads from it
        self.notes: list[str] = []  # what load changed from the plan asked for, one line each
        self.prefill_chunk = prefill_chunk  # prompt tokens per forward pass (--batch-size)
        if kv_cache is None:
            check_context_memory(config, context_length, device, dtype, kv_bits, prefill_chunk)
            kv_cache = KVCache(config, context_length, device, dtype, kv_bits, prefill_chunk)
        cache = kv_cache
        self.kv_bits = cache.bits  # 16: keys and values in the compute dtype; 8: int8 with scales
        rope = RotaryTable(config, context_length, device, dtype)
        for layer in dense.layers:
            fuse_qkv(layer)  # one matmul for q, k and v in a decode step (plain projections)
        self.model = MixtralModel(config, dense, experts, cache, rope)
        self._token = torch.zeros(1, dtype=torch.int64, device=dense.token_device)  # decode's input, reused
        self._sequence: list[int] = []  # the ids whose keys and values the KV cache holds, in order

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        *,
        device: str = "auto",
        dtype: str | torch.dtype | None = None,
        context_length: int | None = None,
        max_context: int | None = None,
        progress: ProgressFn | None = None,
        vram: int | str | None = None,
        ram: int | str | None = None,
        experts_per_layer: int | None = None,
        policy: str = "auto",
        prefetch_depth: int = 1,
        expert_format: str | None = None,
        expert_bits: int | None = None,
        attn_bits: int | None = None,
        replay: str | Path | None = None,
        cpu_experts: str = "auto",
        machine: Any = None,
        kv_bits: int = 16,
        batch_size: int | None = None,
    ) -> Engine:
        """Load a Hugging Face Mixtral checkpoint directory, a hub id already in the local
        Hugging Face cache (``mistralai/Mixtral-8x7B-Instruct-v0.1``), or an offload pack.

        Every input is checked before weights are read. With no budget (``vram``, ``ram``,
        ``experts_per_layer``) every expert is resident on the device; with one, experts go
        through the expert cache. ``dtype`` (compute) defaults to an unquantized pack's own
        dtype, else bfloat16. ``expert_format`` (``offload.quant``: "int8", "nf4", ...) stores
        experts quantized; a pack's experts keep the format it was converted with.
        ``expert_bits`` / ``attn_bits`` (4, 8 or 16) pick a format by width for the experts and
        for the attention projections (``quant.format_for_bits``); embeddings, lm_head, norms
        and routers stay in the compute dtype. ``prefetch_depth``: how many layers ahead gate
        look-ahead prefetches (policies ``lookahead`` and ``combined``; 1 = the next layer).
        ``replay``: a router trace (``offload.trace``) whose experts and gate weights replace the
        routers' choices, position by position; gate look-ahead cannot be replayed (a trace
        holds no hidden states), so ``auto`` is ``REPLAY_POLICY`` then and look-ahead refused.
        ``cpu_experts`` (``offload.experts.cache.CPU_EXPERTS``): where a miss whose record is in
        the RAM tier runs: "auto" on its RAM copy on a CPU device (a copy into a "slot" in RAM
        would only move bytes) and by the placement cost model on CUDA; "all" always on the CPU;
        "off" always loaded into a device slot (the device computes every expert).
        ``machine``: a machine profile (``offload.profile.Profile``) whose measured link, GPU and
        CPU costs that cost model takes (``Costs.from_profile``); None, or a profile lacking a
        figure: the stated defaults of ``offload.experts.placement.default_costs``.
        ``kv_bits`` (``--kv-bits``): the KV cache's width, 16 (the compute dtype) or 8 (int8 codes
        with one scale per layer, head and position: ``offload.model.KVCache``). ``batch_size``
        (``--batch-size``): prompt tokens per forward pass (``prefill_chunk``); None: the memory
        plan's chunk (``MemoryPlan.prefill_chunk``, fitted to the device) under a budget, else
        ``offload.plan.PREFILL_CHUNK_TOKENS``.
        """
        if expert_format is not None and expert_bits is not None:
            raise SettingError("give --expert-format or --expert-bits, not both")
        model_dir = resolve_model(model_dir)  # a directory, or a hub id found in the local HF cache
        torch_device = resolve_device(device)
        requested = parse_dtype(dtype) if dtype is not None else None
        requested_format = get_format(expert_format) if expert_format is not None else None
        if prefetch_depth < 1:
            raise SettingError(f"--prefetch-depth {prefetch_depth}: must be at least 1")
        if cpu_experts not in CPU_EXPERTS:
            raise SettingError(f"--cpu-experts {cpu_experts!r}: choose one of {', '.join(CPU_EXPERTS)}")
        kv_bits = check_kv_bits(kv_bits, "--kv-bits")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise SettingError(f"--batch-size {batch_size!r}: must be a whole number of tokens, at least 1")
        chunk = PREFILL_CHUNK_TOKENS if batch_size is None else batch_size  # the plan may choose another
        if policy == "auto":
            policy = DEFAULT_POLICY if replay is None else REPLAY_POLICY
        eviction, predictor = cache_policy(policy)
        if replay is not None and predictor in ("lookahead", "combined"):
            raise SettingError(
                f"--policy {policy} with --replay: gate look-ahead needs the hidden states a trace does "
                f"not hold; choose lru, lfu or history (auto: {REPLAY_POLICY})"
            )
        config = ModelConfig.from_dir(model_dir)
        routing = None
        if replay is not None:
            from offload.trace import ReplayRouting

            routing = ReplayRouting.from_file(replay, config, torch_device)  # checked before weights load
        tokenizer = Tokenizer.from_dir(model_dir)
        if tokenizer.vocab_size > config.vocab_size:
            raise TokenizerError(
                f"{tokenizer.source}: {tokenizer.vocab_size} tokens but the model has "
                f"only {config.vocab_size} embeddings"
            )
        tokenizer.pad_to(config.vocab_size)  # ids past the tokenizer's (Qwen's padded rows) decode to ""
        if context_length is None:  # as much as the model allows, up to max_context (default 4096)
            context_length = min(config.max_position_embeddings, max_context or DEFAULT_CONTEXT)
        if not 1 <= context_length <= config.max_position_embeddings:
            raise SettingError(
                f"context length {context_length} must be in [1, {config.max_position_embeddings}]"
            )
        source: Checkpoint | Pack = Pack(model_dir) if is_pack(model_dir) else Checkpoint(model_dir, config)
        try:
            torch_dtype, layout, attn_format = weight_formats(
                source, torch_device, requested, requested_format, expert_bits, attn_bits
            )
            # before any weight loads
            check_context_memory(config, context_length, torch_device, torch_dtype, kv_bits, chunk)
            budgeted = vram is not None or ram is not None or experts_per_layer is not None
            dense = load_dense(source, torch_device, torch_dtype, attn_format, progress)
            if not budgeted:
                experts = load_resident_experts(source, layout, torch_device, torch_dtype, progress)
                source.close()
                engine = cls(config, tokenizer, dense, experts, torch_device, torch_dtype, context_length,
                             kv_bits=kv_bits, prefill_chunk=chunk)
                engine.model_name = str(model_dir)
                engine.model.routing_source = routing
                return engine
            plan = plan_memory(
                config,
                layout.nbytes,
                torch_dtype,
                context_length,
                vram=None if vram is None else parse_bytes(vram, "--vram"),
                ram=None if ram is None else parse_bytes(ram, "--ram"),
                experts_per_layer=experts_per_layer,
                ram_available=spare_ram(torch_device, config, torch_dtype),
                dense=device_dense_bytes(config, dense_bytes_by_class(config, torch_dtype, attn_format), torch_device),
                device_type=torch_device.type,
                expert_format=layout.fmt,
                attn_format=attn_format,
                quantize_experts=not isinstance(source, Pack),  # records from a checkpoint: quantized on the device
                prefill_tokens=batch_size,  # None: the plan fits the chunk to the device
                kv_bits=kv_bits,
                sdpa=sdpa_path(torch_device),  # pre-Ampere cards: the math path's larger reserve
            )
            chunk = getattr(plan, "prefill_chunk", chunk)
            # the KV cache before the slots, so that on CUDA the slots are checked against what is
            # really free once the dense weights and the KV cache are in place
            check_context_memory(config, context_length, torch_device, torch_dtype, kv_bits, chunk)
            kv_cache = KVCache(config, context_length, torch_device, torch_dtype, kv_bits, chunk)
            notes = []
            free = memory_info(torch_device)
            if free is not None:
                plan, note = fit_to_free(plan, free[0])
                notes += [note] if note else []
            records = source if isinstance(source, Pack) else CheckpointRecords(source, layout, torch_device)
            history = spec = None
            if predictor in ("history", "combined"):
                spec = PREFETCH_POLICIES["history"]
                history = spec.make(config.num_moe_layers, config.num_local_experts, config.num_experts_per_tok)
                eviction = ScoreEviction(history, config.num_moe_layers, config.num_local_experts)
            cache = ExpertCache(
                records,
                layout,
                config.num_moe_layers,  # expert layers: a dense-MLP layer has no slots
                config.num_local_experts,
                config.num_experts_per_tok,
                torch_device,
                slots_per_layer=plan.layer_slots,
                host_capacity=plan.host_experts,
                policy=eviction,
                progress=progress,
                host_chunks=plan.host_chunks,
                cpu_experts=cpu_experts,
                placer=make_placer(torch_device, layout, config, machine, notes) if cpu_experts == "auto" else None,
            )
        except BaseException:
            source.close()
            raise
        engine = cls(config, tokenizer, dense, cache, torch_device, torch_dtype, context_length, plan, source, kv_cache,
                     prefill_chunk=getattr(plan, "prefill_chunk", chunk))
        engine.model_name, engine.policy = str(model_dir), policy
        engine.notes = notes
        engine.model.routing_source = routing
        defer = is_cuda(torch_device)  # see Prefetcher: on CUDA, decide while the GPU computes
        if predictor == "lookahead":
            engine.model.prefetcher = Prefetcher(
                cache, Lookahead(config, dense, prefetch_depth), width=config.num_experts_per_tok, defer=defer
            )
        elif predictor == "history":
            engine.model.prefetcher = Prefetcher(cache, history=history, spec=spec, defer=defer)
        elif predictor == "combined":
            engine.model.prefetcher = Prefetcher(
                cache,
                Lookahead(config, dense, prefetch_depth),
                width=config.num_experts_per_tok,
                history=history,
                spec=spec,
                defer=defer,
            )
        return engine

    def close(self) -> None:
        """Release the weight source (files stay open while the cache reads experts)."""
        if self.cache is not None:
            self.cache.close()
        if self._source is not None:
            self._source.close()
            self._source = None

    # ---- the forward steps ---------------------------------------------------------------------

    @property
    def sequence(self) -> tuple[int, ...]:
        """The ids whose keys and values the KV cache holds now, in order (a copy): the last
        prompt, then every token decoded after it (not the last token sampled, never run)."""
        return tuple(self._sequence) if self._sequence_valid() else ()

    def _sequence_valid(self) -> bool:
        """Does the kept sequence describe the KV cache, and can it be continued? Not when someone
        ran the model directly, nor when a pass stopped halfway overwrote ring slots it needs."""
        cache = self.model.cache
        return len(self._sequence) == cache.length and cache.can_continue(cache.length)

    def reset(self) -> None:
        """Forget the current sequence (the KV cache is reused, not reallocated)."""
        self.model.cache.reset()
        self._sequence = []
        if self.model.prefetcher is not None:
            self.model.prefetcher.reset()

    def truncate(self, length: int) -> None:
        """Keep only the first ``length`` positions of the sequence (0: ``reset``). The keys and
        values of a position depend only on the positions before it, so what is kept stays valid;
        what lay beyond is overwritten by the next forward pass. A sliding window's ring may have
        overwritten what position ``length`` attends to (the held sequence ran on past it by more
        than a prefill chunk): that is refused (``reusable_prefix`` never offers it)."""
        if not 0 <= length <= len(self.sequence):
            raise SettingError(f"cannot keep {length} positions of a sequence of {len(self.sequence)}")
        if length == 0:
            self.reset()
            return
        cache = self.model.cache
        if not cache.can_continue(length):
            raise SettingError(
                f"cannot keep {length} positions: the KV cache's ring of {cache.capacity} slots "
                f"(sliding window {cache.window}) holds positions {cache.oldest} on, and position {length} "
                f"attends to {cache.first_key(length)} on"
            )
        self.model.cache.length = length
        del self._sequence[length:]

    def reusable_prefix(self, ids: Sequence[int]) -> int:
        """How many leading ids of ``ids`` the KV cache holds already: the longest common prefix
        of ``ids`` and ``sequence``, less one when it is the whole of ``ids`` (the last id must run
        again to give the logits that follow it), or 0 when a sliding window's ring no longer holds
        what that position attends to (the held sequence ran on too far past it). Changes nothing."""
        held = self.sequence
        n = 0
        for a, b in zip(held, ids):
            if a != b:
                break
            n += 1
        n = min(n, len(ids) - 1) if ids else 0
        return n if self.model.cache.can_continue(n) else 0

    def keep_prefix(self, ids: Sequence[int]) -> int:
        """Truncate the sequence to ``reusable_prefix(ids)`` positions and return that count:
        ``extend(ids[count:])`` then continues ``ids``."""
        n = self.reusable_prefix(ids)
        self.truncate(n)
        return n

    def _check_room(self, ids: Sequence[int], start: int) -> None:
        if not ids:
            raise SettingError("the prompt is empty")
        if start + len(ids) > self.context_length:
            held = f" after the {start} held" if start else ""
            raise SettingError(
                f"prompt of {len(ids)} tokens{held} exceeds the context length {self.context_length}"
            )

    def extend(self, ids: Sequence[int], should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
        """Run ``ids`` at the end of the held sequence, as prompt (prefill); logits [V] for the
        token after them. The tokens run in chunks ending at multiples of ``prefill_chunk``
        positions (``--batch-size``, the size the plan's device reserve is made for), each chunk
        expert-major; a chunk of one token runs as a decode step.

        ``should_stop`` is asked before each chunk: when it answers True, ``PrefillInterrupted``
        is raised and the sequence holds the chunks that ran (a consistent state to continue
        from, truncate or reset). An exception out of a forward pass keeps the same state."""
        self._check_room(ids, len(self.sequence))
        if not self._sequence_valid():
            self.reset()
        chunk, ran, first = self.prefill_chunk, 0, 0
        while first < len(ids):
            if should_stop is not None and should_stop():
                raise PrefillInterrupted(ran)
            position = len(self._sequence)
            last = min(len(ids), first + chunk - position % chunk)  # the chunk ends on a multiple of ``chunk``
            logits = self._forward(ids[first:last])  # [1, V]
            ran, first = ran + last - first, last
        return logits[0]

    def _forward(self, ids: Sequence[int]) -> torch.Tensor:
        """One forward pass of ``ids`` at the end of the sequence; logits [1, V] for the last.
        The kept sequence grows only when the pass completes (the KV cache's length too)."""
        tokens = torch.tensor(ids, dtype=torch.int64, device=self.model.dense.token_device)  # [T]
        try:
            logits = self.model.forward(tokens, last_only=True)  # [1, V]
        except BaseException:
            self._abandon_pass()
            raise
        self._sequence.extend(ids)
        return logits

    def _abandon_pass(self) -> None:
        """After an exception (a Ctrl+C) inside a forward pass: the KV cache holds the kept
        sequence again (positions the pass wrote lie beyond it), and the prefetcher forgets the
        half-seen token (the layers of a prompt pass it had gathered, a deferred prefetch): its
        state only steers loads, never what is computed."""
        self.model.cache.length = len(self._sequence)
        prefetcher = self.model.prefetcher
        if prefetcher is not None:
            prefetcher.reset()  # also the layers of the abandoned prompt pass, a deferred prefetch

    def prefill(self, ids: Sequence[int], *, reuse: bool = False,
                should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
        """Logits [V] for the token after ``ids``, with ``ids`` held as the sequence. Without
        ``reuse`` a new sequence (everything prefilled); with it, the positions ``ids`` shares
        with the held sequence are kept (``keep_prefix``) and only the rest runs (``extend``)."""
        self._check_room(ids, 0)
        if reuse:
            start = self.keep_prefix(ids)
        else:
            start = 0
            self.reset()
        return self.extend(ids[start:], should_stop)

    def decode(self, token: int) -> torch.Tensor:
        """Append one token to the sequence; logits [V] for the next one."""
        self._token.fill_(token)
        try:
            logits = self.model.forward(self._token, last_only=True)[0]  # [V]
        except BaseException:
            self._abandon_pass()
            raise
        self._sequence.append(int(token))
        return logits

    def logits(self, ids: Sequence[int]) -> torch.Tensor:
        """Logits [T, V] for every position of a new sequence (used for evaluation)."""
        self.reset()
        tokens = torch.tensor(ids, dtype=torch.int64, device=self.model.dense.token_device)
        logits = self.model.forward(tokens)  # [T, V]
        self._sequence = list(ids)
        return logits

    def generate(self, prompt_ids: Sequence[int], settings: GenerationSettings | None = None,
                 should_stop: Callable[[], bool] | None = None) -> Generation:
        """A lazy generation: iterate it to stream, or call ``.run()``. With
        ``settings.reuse_prefix`` the prompt's common prefix with the held sequence is kept and
        only the rest prefilled; ``should_stop`` is asked between prompt chunks (a True ends the
        generation before its first token, ``stop_reason`` "interrupted")."""
        return Generation(self, prompt_ids, settings or GenerationSettings(), should_stop)


def make_placer(device: torch.device, layout, config: ModelConfig, machine: Any = None, notes: list[str] | None = None):
    """The cost model's choice of which misses run on the CPU, for ``--cpu-experts auto`` on a
    device that is not the host (None on a CPU device, where every miss in RAM runs in place),
    priced by ``machine``'s measured costs when it has them (else the stated defaults, and a line
    in ``notes`` saying which figure was missing)."""
    if device.type == "cpu":
        return None
    from offload.experts.placement import Costs, default_costs, engine_placer
    from offload.kernels import cpu4

    kernel = cpu4.status()
    if kernel.path == "torch":  # dequantize + matmul on the CPU: 20-50x the kernel's time; no miss is sooner there
        if notes is not None:
            notes.append(f"--cpu-experts auto: every miss runs on the GPU: {kernel.reason}")
        return lambda layer, misses, cache, tokens=None: []
    costs = None
    if machine is not None:
        try:
            costs = Costs.from_profile(machine, int(layout.nbytes))
        except SettingError as e:
            costs = default_costs(int(layout.nbytes))
            if notes is not None:
                notes.append(f"--cpu-experts auto: {e}; the cost model takes the stated defaults ({costs.describe()})")
    return engine_placer(device, layout, config, costs)


def check_context_memory(config: ModelConfig, context_length: int, device: torch.device, dtype: torch.dtype,
                         kv_bits: int = 16, chunk: int | None = PREFILL_CHUNK_TOKENS) -> None:
    """Refuse, before anything is allocated, a context whose KV cache and rotary tables do not fit
    in the memory free now: RAM (psutil's available) on a CPU, the device's free memory on CUDA
    (the rotary tables are computed in fp32 in RAM first). A BudgetError states both figures and
    the longest context that fits. The KV cache is what ``KVCache(..., kv_bits, chunk)`` allocates
    (``kv_cache_nbytes``: a sliding window's ring stops growing at ``kv_capacity`` positions); the
    rotary figure is the peak of ``RotaryTable``'s fp32 temporaries (about 14 bytes per position
    and head dimension) plus its two tables, for every position."""
    import psutil

    from offload import device as devices  # the module's own memory_info: tests replace the one here

    itemsize = torch.empty((), dtype=dtype).element_size()
    tables_per_token = 2 * config.head_dim * itemsize  # cos and sin_signed, on the device
    temp_per_token = 14 * config.head_dim + 8  # fp32 positions, freqs, angles, cos and sin
    kv_bytes = kv_cache_nbytes(config, context_length, dtype, kv_bits, chunk)
    slots = kv_capacity(config, context_length, chunk)
    width = "" if kv_bits == 16 else f"{kv_bits}-bit, "
    if slots < context_length:
        held = f"{width}a ring of {slots} positions for the {config.sliding_window}-token window"
    else:
        held = f"{width}{format_bytes(kv_cache_nbytes(config, 1, dtype, kv_bits))} per position"
    kv = f"the KV cache ({format_bytes(kv_bytes)}, {held}) and rotary tables need"
    ram = psutil.virtual_memory().available
    free = devices.memory_info(device)

    def kv_and(per_token: int):  # context -> bytes: the KV cache and ``per_token`` for every position
        return lambda n: kv_cache_nbytes(config, n, dtype, kv_bits, chunk) + per_token * n

    if free is None:  # everything in RAM
        checks = [(kv, "RAM", ram, kv_and(tables_per_token + temp_per_token))]
    else:
        checks = [(kv, "device memory", free[0], kv_and(tables_per_token)),
                  ("the rotary tables' fp32 temporaries need", "RAM", ram, lambda n: temp_per_token * n)]
    for what, where, available, need_of in checks:
        need = need_of(context_length)
        if need > available:
            lo, hi = 0, context_length  # the longest context that fits: need_of grows with n
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if need_of(mid) <= available else (lo, mid - 1)
            raise BudgetError(
                f"context length {context_length}: {what} {format_bytes(need)} of {where}, and "
                f"{format_bytes(available)} is free; at most {lo} positions fit (--context {lo})"
            )
