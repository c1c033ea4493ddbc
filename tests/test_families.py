"""Qwen3-MoE, Qwen2-MoE and OLMoE against transformers' own classes on the same files.

The oracle is transformers (fp32 on CPU): prefill logits and 32 cached decode steps within 1e-4,
the experts chosen in every layer identical, 64 greedy tokens identical. Then the expert cache
at its smallest budget (top-k slots per layer), with every policy and with misses copied or run
in place, bit-identical to the all-resident run of the same engine; the same from a pack, and
with experts quantized. bf16 is held to the bound test_equivalence states for Mixtral.
"""

from __future__ import annotations

import json

import pytest
import torch

from offload.config import ModelConfig
from offload.engine import Engine, GenerationSettings
from offload.errors import UnsupportedModelError
from offload.pack import convert
from tests.family_builder import FAMILY_SHAPES, load_family_reference, write_family
from tests.test_equivalence import (
    DECODE_STEPS,
    FP32_TOLERANCE,
    GREEDY_TOKENS,
    PROMPT,
    assert_bf16_bound,
    hf_greedy,
    hf_prefill_and_steps,
)

NAMES = [s.name for s in FAMILY_SHAPES]
SHAPES = {s.name: s for s in FAMILY_SHAPES}
POLICIES = ("lru", "lfu", "lookahead", "history", "combined", "auto")


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {s.name: write_family(root / s.name, s) for s in FAMILY_SHAPES}


@pytest.fixture(scope="module")
def family_refs(family_dirs):
    return {name: load_family_reference(path, SHAPES[name]) for name, path in family_dirs.items()}


@pytest.fixture(scope="module")
def family_engines(family_dirs):
    return {name: Engine.load(path, device="cpu", dtype="float32") for name, path in family_dirs.items()}


def prompt_ids(engine: Engine) -> list[int]:
    return engine.tokenizer.encode(PROMPT, bos=True)  # no bos: these tokenizers have none


def test_configs_read_as_their_family(family_dirs):
    c = {name: ModelConfig.from_dir(path) for name, path in family_dirs.items()}
    assert (c["qwen3_moe"].family, c["qwen3_moe"].qk_norm, c["qwen3_moe"].norm_topk_prob) == ("qwen3_moe", "head", True)
    assert c["qwen3_moe"].head_dim == 32 != 64 // 4  # head_dim unlike hidden / heads
    assert (c["qwen3_moe"].intermediate_size, c["qwen3_moe"].num_local_experts) == (48, 16)  # moe width, num_experts
    assert c["qwen3_moe"].qkv_bias and c["qwen3_moe"].o_bias
    assert c["qwen2_moe"].shared_expert_intermediate_size == 80 and c["qwen2_moe"].qkv_bias
    assert not c["qwen2_moe"].o_bias and not c["qwen2_moe"].norm_topk_prob
    assert (c["olmoe"].qk_norm, c["olmoe"].clip_qkv, c["olmoe"].num_experts_per_tok) == ("projection", 4.0, 8)
    assert all(x.gate_in_model_dtype for x in c.values())
    assert (c["qwen3_moe_dense_layer"].dense_layers, c["qwen3_moe_dense_layer"].moe_layers) == ((1,), (0, 2))
    assert c["qwen3_moe_dense_layer"].dense_intermediate_size == 72
    assert (c["qwen2_moe_sparse_step"].dense_layers, c["qwen2_moe_sparse_step"].moe_layers) == ((0, 2), (1, 3))


@pytest.mark.parametrize("name", NAMES)
def test_prefill_and_cached_decode_match_transformers(name, family_engines, family_refs):
    engine, reference = family_engines[name], family_refs[name]
    ids = prompt_ids(engine)
    forced = torch.randint(3, engine.config.vocab_size, (DECODE_STEPS,), generator=torch.Generator().manual_seed(1))
    ours_chosen: dict[int, list[torch.Tensor]] = {}
    engine.model.routing_observer = lambda layer, experts, _w: ours_chosen.setdefault(layer, []).append(experts.clone())
    try:
        ours_prefill = engine.logits(ids)
        ours_steps = [engine.decode(int(t)) for t in forced]
    finally:
        engine.model.routing_observer = None
    hf_prefill, hf_steps, hf_chosen = hf_prefill_and_steps(reference, ids, forced)
    assert (ours_prefill - hf_prefill).abs().max().item() <= FP32_TOLERANCE
    diffs = [(a - b).abs().max().item() for a, b in zip(ours_steps, hf_steps)]
    assert max(diffs) <= FP32_TOLERANCE, diffs
    K = engine.config.num_experts_per_tok
    assert sorted(hf_chosen) == list(engine.config.moe_layers)  # transformers routes these layers only
    for layer, decoder_layer in enumerate(engine.config.moe_layers):  # the engine numbers expert layers
        ours, theirs = torch.cat(ours_chosen[layer]), torch.cat(hf_chosen[decoder_layer])
        assert ours.shape == theirs.shape == (len(ids) + DECODE_STEPS, K)
        # the same set per token (transformers orders ties of probability and logit alike)
        assert torch.equal(ours.sort(-1).values, theirs.sort(-1).values), f"layer {layer} routed differently"


@pytest.mark.parametrize("name", NAMES)
def test_greedy_tokens_match_transformers(name, family_engines, family_refs):
    engine, reference = family_engines[name], family_refs[name]
    ids = prompt_ids(engine)
    ours = engine.generate(ids, GenerationSettings(max_new_tokens=GREEDY_TOKENS, ignore_eos=True)).run().tokens
    theirs = hf_greedy(reference, ids, GREEDY_TOKENS)
    assert ours == theirs
    assert len(set(theirs)) > 16  # not two constant streams


def _run(engine, ids, n=10):
    gen = engine.generate(ids, GenerationSettings(max_new_tokens=n, ignore_eos=True)).run()
    return gen, engine.logits(ids)


@pytest.mark.parametrize("name", NAMES)
def test_smallest_cache_with_every_policy_is_bit_identical(name, family_dirs, family_engines):
    ref = family_engines[name]
    ids = prompt_ids(ref)
    want_gen, want_logits = _run(ref, ids)
    K, E = ref.config.num_experts_per_tok, ref.config.num_local_experts
    for policy in POLICIES:
        for cpu_experts in ("off", "auto"):
            engine = Engine.load(family_dirs[name], device="cpu", dtype="float32", experts_per_layer=K,
                                 ram=0 if cpu_experts == "off" else None, policy=policy, cpu_experts=cpu_experts)
            what = f"{policy}, cpu experts {cpu_experts}"
            gen, logits = _run(engine, ids)
            assert gen.tokens == want_gen.tokens, what
            assert torch.equal(logits, want_logits), what
            total = gen.cache_stats.total()
            assert total.misses > 0, what  # K of E slots: the cache really worked
            engine.close()
    assert K < E


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("fmt", [None, "nf4"])
def test_pack_and_quantized_experts_through_the_cache(name, fmt, family_dirs, tmp_path):
    """A pack converted from the checkpoint gives the checkpoint's logits; nf4 experts through
    the smallest cache give the all-resident nf4 run's."""
    source = family_dirs[name]
    pack = tmp_path / "pack"
    convert(source, pack, dtype=torch.float32, expert_format=fmt)
    ref = Engine.load(source, device="cpu", dtype="float32", expert_format=fmt)
    ids = prompt_ids(ref)
    want_gen, want_logits = _run(ref, ids, 6)
    K = ref.config.num_experts_per_tok
    engine = Engine.load(pack, device="cpu", dtype="float32", experts_per_layer=K, policy="lru")
    gen, logits = _run(engine, ids, 6)
    assert gen.tokens == want_gen.tokens
    assert torch.equal(logits, want_logits)


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_logits_are_as_close_to_fp32_as_transformers_bf16(name, family_dirs, family_refs):
    engine = Engine.load(family_dirs[name], device="cpu", dtype="bfloat16")
    ids = prompt_ids(engine)
    ours = engine.logits(ids)
    assert ours.dtype == torch.bfloat16
    ours = ours.float()
    hf_bf16 = load_family_reference(family_dirs[name], SHAPES[name], dtype=torch.bfloat16)
    with torch.no_grad():
        fp32 = family_refs[name](torch.tensor([ids])).logits[0]
        theirs = hf_bf16(torch.tensor([ids])).logits[0].float()
    assert_bf16_bound(ours, theirs, fp32)


def test_other_architectures_are_refused_by_name(family_dirs, tmp_path):
    raw = json.loads((family_dirs["qwen3_moe"] / "config.json").read_text())
    raw.update(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3")
    with pytest.raises(UnsupportedModelError, match="DeepseekV3ForCausalLM.*Qwen3MoeForCausalLM"):
        ModelConfig.from_dict(raw)


def test_missing_family_tensor_is_named(family_dirs, tmp_path):
    """A Qwen2-MoE checkpoint without its shared expert gate: the error names the tensor."""
    import shutil

    from safetensors.torch import load_file, save_file

    from offload.checkpoint import Checkpoint
    from offload.errors import MissingTensorError

    d = tmp_path / "broken"
    shutil.copytree(family_dirs["qwen2_moe"], d)
    tensors = {}
    for shard in sorted(d.glob("*.safetensors")):
        tensors.update(load_file(shard))
        shard.unlink()
    (d / "model.safetensors.index.json").unlink()
    del tensors["model.layers.1.mlp.shared_expert_gate.weight"]
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(MissingTensorError, match=r"model\.layers\.1\.mlp\.shared_expert_gate\.weight"):
        Checkpoint(d)


@pytest.mark.parametrize("change, match", [
    ({"mlp_only_layers": [0, 1, 2]}, r"leave no layer with experts"),
    ({"decoder_sparse_step": 0}, r"decoder_sparse_step must be an integer from 1"),
    ({"mlp_only_layers": [7]}, r"mlp_only_layers must be a list of layer numbers below 3"),
    ({"norm_topk_prob": "yes"}, r"norm_topk_prob must be true or false"),
    ({"num_experts": 0}, r"num_experts must be an integer from 1"),
])
def test_qwen3_config_errors_name_the_field(family_dirs, change, match):
    from offload.errors import ConfigError

    raw = json.loads((family_dirs["qwen3_moe"] / "config.json").read_text())
    raw.pop("num_local_experts", None)
    raw["num_experts"] = 16
    raw.update(change)
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_dict(raw, source="config.json")


def test_qwen_sliding_window_applies_only_when_used(family_dirs):
    from offload.errors import ConfigError

    raw = json.loads((family_dirs["qwen2_moe"] / "config.json").read_text())
    assert ModelConfig.from_dict(dict(raw, sliding_window=4096, use_sliding_window=False)).sliding_window is None
    with pytest.raises(ConfigError, match="use_sliding_window true"):
        ModelConfig.from_dict(dict(raw, sliding_window=4096, use_sliding_window=True))
    q3 = json.loads((family_dirs["qwen3_moe"] / "config.json").read_text())
    assert ModelConfig.from_dict(dict(q3, sliding_window=64, use_sliding_window=True)).sliding_window == 64


def test_olmoe_clip_qkv_is_checked(family_dirs):
    from offload.errors import ConfigError

    raw = json.loads((family_dirs["olmoe"] / "config.json").read_text())
    with pytest.raises(ConfigError, match="clip_qkv must be null or a positive number"):
        ModelConfig.from_dict(dict(raw, clip_qkv=-1))
