"""Checks that need a CUDA device; every test here is marked ``gpu`` and skips without one.

Run them where a GPU is at hand with ``python -m pytest -q -m gpu``.
"""

from __future__ import annotations

import pytest
import torch

from offload.engine import Engine, GenerationSettings
from tests.model_builder import SHAPES

pytestmark = pytest.mark.gpu

PROMPT = "def parse_args(argv):\n    parser = argparse.ArgumentParser()\n    return parser"


@pytest.mark.parametrize("shape", [s.name for s in SHAPES])
def test_cuda_bf16_matches_transformers_on_cuda(shape, model_dirs):
    """The engine's bf16 logits on CUDA are as close to the fp32 reference as transformers' own
    bf16 logits on CUDA (the same bound as the CPU test)."""
    from transformers import MixtralForCausalLM

    engine = Engine.load(model_dirs[shape], device="cuda", dtype="bfloat16")
    ids = engine.tokenizer.encode(PROMPT, bos=True)
    ours = engine.logits(ids).float().cpu()
    x = torch.tensor([ids], device="cuda")
    with torch.no_grad():
        fp32 = MixtralForCausalLM.from_pretrained(model_dirs[shape], dtype=torch.float32).cuda().eval()(x).logits[0].cpu()
        bf16 = MixtralForCausalLM.from_pretrained(model_dirs[shape], dtype=torch.bfloat16).cuda().eval()(x).logits[0].float().cpu()
    assert (ours - fp32).abs().mean() <= 1.5 * (bf16 - fp32).abs().mean()
    assert (ours - fp32).abs().max() <= 1.5 * (bf16 - fp32).abs().max()


@pytest.mark.parametrize("shape", [s.name for s in SHAPES])
def test_cuda_fp32_matches_transformers_tightly(shape, model_dirs, references):
    engine = Engine.load(model_dirs[shape], device="cuda", dtype="float32")
    ids = engine.tokenizer.encode(PROMPT, bos=True)
    with torch.no_grad():
        theirs = references[shape](torch.tensor([ids])).logits[0]
    # TF32 matmuls are off by default in torch; the bound is the CPU test's, loosened for GPU kernels
    assert (engine.logits(ids).cpu() - theirs).abs().max() <= 1e-3


@pytest.mark.parametrize("shape", [s.name for s in SHAPES])
@pytest.mark.parametrize("ram", [0, None])
def test_cuda_cache_with_half_the_experts_is_bit_identical(shape, ram, model_dirs, packs):
    ref = Engine.load(model_dirs[shape], device="cuda", dtype="bfloat16")
    c = ref.config
    ids = ref.tokenizer.encode(PROMPT, bos=True)
    settings = GenerationSettings(max_new_tokens=24, ignore_eos=True)
    want = ref.generate(ids, settings).run().tokens
    want_logits = ref.logits(ids)
    half = max(c.num_experts_per_tok, c.num_local_experts // 2)
    for source in (model_dirs[shape], packs[(shape, "bfloat16")]):
        for policy, depth in (("lru", 1), ("combined", 1), ("combined", 3)):
            engine = Engine.load(
                source, device="cuda", dtype="bfloat16", experts_per_layer=half, ram=ram, policy=policy,
                prefetch_depth=depth, cpu_experts="off",  # every expert on the GPU: exact
            )
            gen = engine.generate(ids, settings).run()
            assert gen.tokens == want, (policy, depth)
            assert torch.equal(engine.logits(ids), want_logits), (policy, depth)
            assert gen.cache_stats.total().misses > 0


def test_a_demand_copy_does_not_queue_behind_prefetch_copies():
    """Prefetches and demand loads use separate copy streams: a demand load started after eight
    large prefetches is done while the last prefetch still runs (FIFO on one stream would make it
    wait for all eight)."""
    from offload.device import Transfers, empty_host_buffer

    device = torch.device("cuda")
    nbytes = 256 << 20
    transfers = Transfers(device, nbytes)
    host = empty_host_buffer(nbytes, 9, device)  # pinned
    slots = torch.empty((9, nbytes), dtype=torch.uint8, device=device)
    prefetches = [transfers.copy(slots[i], host[i]) for i in range(8)]
    demand = transfers.copy(slots[8], host[8], needed_now=True)
    demand.synchronize()
    assert not prefetches[-1].query()
    torch.cuda.synchronize()


def test_decode_steps_take_no_new_device_memory_segments(model_dirs):
    """After warm-up, decode steps are served by the caching allocator's existing segments: no
    cudaMalloc in the decode loop, with the cache on."""
    engine = Engine.load(model_dirs[SHAPES[0].name], device="cuda", dtype="bfloat16", experts_per_layer=2)
    ids = engine.tokenizer.encode(PROMPT, bos=True)
    token = int(engine.prefill(ids).argmax())
    for _ in range(4):
        token = int(engine.decode(token).argmax())
    before = torch.cuda.memory_stats()["segment.all.allocated"]
    for _ in range(16):
        token = int(engine.decode(token).argmax())
    assert torch.cuda.memory_stats()["segment.all.allocated"] == before


# ---- experts computed on the CPU beside the GPU (--cpu-experts) ----------------------------------


@pytest.mark.parametrize("fmt", ["nf4", "nf4-dq"])
def test_a_cpu_expert_agrees_with_the_same_expert_on_the_gpu_within_the_stated_bound(fmt):
    """The CPU kernel and bitsandbytes' CUDA kernel on the same record bytes: per-row relative
    error within ``cpu4.GPU_EXPERT_AGREEMENT`` (bf16), at decode and prefill-ish batches."""
    from offload import quant
    from offload.kernels import cpu4
    from offload.model import ExpertWeights, expert_ffn

    if cpu4.status().path == "torch":
        pytest.skip("the CPU kernel cannot be built here")
    D, I = 1024, 3584
    generator = torch.Generator().manual_seed(3)
    weights = [quant.quantize((torch.randn(s, generator=generator) * 0.02).bfloat16(), fmt)
               for s in ((I, D), (I, D), (D, I))]
    on_gpu = [quant.QuantizedMatrix(m.fmt, m.shape, {k: v.cuda() for k, v in m.tensors.items()}) for m in weights]
    for n in (1, 4, 16):
        x = torch.randn(n, D, generator=generator).bfloat16()  # [N, D]
        cpu = expert_ffn(x, ExpertWeights(*weights)).float()
        gpu = expert_ffn(x.cuda(), ExpertWeights(*on_gpu)).float().cpu()
        error = ((cpu - gpu).norm(dim=1) / gpu.norm(dim=1)).max().item()
        assert error <= cpu4.GPU_EXPERT_AGREEMENT, (fmt, n, error)


@pytest.mark.parametrize("cpu_experts", ["auto", "all"])
def test_cpu_experts_beside_the_gpu_keep_the_logits_within_the_stated_bound(cpu_experts, model_dirs):
    """Half the experts on the GPU, the misses on the CPU (all of them, or where the cost model
    says): the logits within ``cpu4.GPU_LOGITS_AGREEMENT`` of the all-resident GPU run, and the
    CPU really ran experts."""
    from offload.kernels import cpu4

    name = SHAPES[0].name
    ref = Engine.load(model_dirs[name], device="cuda", dtype="bfloat16", expert_bits=4)
    ids = ref.tokenizer.encode(PROMPT, bos=True)
    want = ref.logits(ids).float().cpu()
    c = ref.config
    half = max(c.num_experts_per_tok, c.num_local_experts // 2)
    engine = Engine.load(model_dirs[name], device="cuda", dtype="bfloat16", expert_bits=4, experts_per_layer=half,
                         cpu_experts=cpu_experts)
    got = engine.logits(ids).float().cpu()
    error = ((got - want).norm(dim=-1) / want.norm(dim=-1)).max().item()
    assert error <= cpu4.GPU_LOGITS_AGREEMENT, error
    gen = engine.generate(ids, GenerationSettings(max_new_tokens=16, ignore_eos=True)).run()
    if cpu_experts == "all":
        assert gen.cache_stats.total().cpu_runs > 0


@pytest.mark.parametrize("shape", [s.name for s in SHAPES])
def test_untied_embeddings_stay_in_host_ram_and_give_the_same_logits(shape, model_dirs):
    """On CUDA an untied embedding table stays in RAM (offload.plan.embeddings_on_host) and a tied
    one on the card; the logits and greedy tokens equal those of the same engine with the table
    moved onto the card (a gather is exact), with and without the expert cache."""
    from offload.plan import embeddings_on_host

    for budget in ({}, {"experts_per_layer": 2, "cpu_experts": "off"}):
        engine = Engine.load(model_dirs[shape], device="cuda", dtype="bfloat16", **budget)
        dense, c = engine.model.dense, engine.config
        assert dense.embed_tokens.is_cuda is not embeddings_on_host(c, "cuda")
        assert embeddings_on_host(c, "cuda") is not c.tie_word_embeddings
        ids = engine.tokenizer.encode(PROMPT, bos=True)
        settings = GenerationSettings(max_new_tokens=16, ignore_eos=True)
        host_logits, host_tokens = engine.logits(ids), engine.generate(ids, settings).run().tokens
        dense.embed_tokens = dense.embed_tokens.cuda()
        engine._token = engine._token.cuda()
        assert torch.equal(engine.logits(ids), host_logits)
        assert engine.generate(ids, settings).run().tokens == host_tokens


def test_an_int8_kv_read_takes_one_tensor_of_the_compute_dtype():
    """KVCache.read at 8 bits on CUDA: codes times scales in one kernel, so the read takes one
    [2G, S, Dh] bf16 tensor and no cast temporary: what offload.plan.attention_bytes counts."""
    from offload.config import ModelConfig
    from offload.model import KVCache
    from offload.plan import BUILTIN_MODELS, attention_bytes

    config = ModelConfig.from_dict(dict(BUILTIN_MODELS["mixtral-8x7b"][1], num_hidden_layers=2))
    S = 8192
    cache = KVCache(config, S, torch.device("cuda"), torch.bfloat16, bits=8)
    G, Dh = config.num_key_value_heads, config.head_dim
    k, v = torch.randn(2, G, S, Dh, device="cuda", dtype=torch.bfloat16)
    cache.write(0, 0, k, v)
    del k, v
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    keys, values = cache.read(0, 0, S)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    counted = attention_bytes(config, torch.bfloat16, 256, S, kv_bits=8)["kv reads"]
    assert counted == 2 * G * S * Dh * 2
    assert peak <= counted + 2**20, f"read took {peak} bytes, the plan counts {counted}"


@pytest.mark.parametrize("fmt", ["nf4", "nf4-dq"])
def test_a_prompt_chunks_4bit_matmul_holds_one_slice_not_the_whole_weight(fmt):
    """quant.linear on CUDA at 256 rows: the product of bitsandbytes' whole dequantized weight
    (within bf16 rounding), with a peak of one dequantized slice (the reserve's term) and the
    output, not the 112 MiB of Mixtral's w1 in bf16."""
    import bitsandbytes

    from offload import quant

    w = torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
    qm = quant.quantize(w, fmt)
    del w
    x = torch.randn(256, 4096, device="cuda", dtype=torch.bfloat16)
    want = bitsandbytes.matmul_4bit(x, qm.tensors["data"].t(), quant_state=qm.quant_state(x.dtype)).float()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    got = quant.linear(x, qm)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    slice_bytes = quant.dequantized_slice_bytes(qm.shape, qm.fmt, torch.bfloat16)
    output = 256 * 14336 * 2
    assert peak <= slice_bytes + 2 * output + 2**20, f"peak {peak} bytes"
    assert (got.float() - want).abs().max() <= 1e-2 * want.abs().max()
