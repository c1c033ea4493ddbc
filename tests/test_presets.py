"""The built-in presets: every field as the published config.json gives it, the headline totals
the model cards publish (total and active parameters), one expert's 4-bit record by hand, the
plan and estimate `offload info` prints for each, and synthetic packs of the new families that
`Pack` opens with every tensor of their family's table.

The oracles are independent of the code under test: the published numbers are typed here from
the model cards and config files (not read from ``BUILTIN_MODELS``), and the byte and time
figures are written out by hand."""

from __future__ import annotations

import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from cli.info import info_command
from offload.checkpoint import layer_table
from offload.estimate import Machine, estimate_plan
from offload.experts.record import RecordLayout
from offload.pack import Pack
from offload.plan import (
    BUILTIN_MODELS,
    builtin_model,
    dense_bytes,
    parameter_count,
    plan_model,
)
from offload.synth import MAX_SYNTH_VOCAB, _tokenizer_pieces, synthesize
from tests.test_kv_plan import nf4_dq_matrix

GiB = 2**30

# ModelConfig's fields for each preset, from the published config.json (ModelConfig's spelling:
# intermediate_size is one routed expert's width, num_local_experts the routed experts a layer).
COMMON = dict(sliding_window=None, tie_word_embeddings=False, torch_dtype="bfloat16", clip_qkv=None,
              dense_layers=(), dense_intermediate_size=None)  # every layer has experts
PUBLISHED = {
    "mixtral-8x7b": dict(
        COMMON, family="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128, num_local_experts=8,
        num_experts_per_tok=2, rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=32768,
        qk_norm=None, qkv_bias=False, o_bias=False, norm_topk_prob=True, gate_in_model_dtype=False,
        shared_expert_intermediate_size=None,
    ),
    "mixtral-8x22b": dict(
        COMMON, family="mixtral", vocab_size=32768, hidden_size=6144, intermediate_size=16384,
        num_hidden_layers=56, num_attention_heads=48, num_key_value_heads=8, head_dim=128, num_local_experts=8,
        num_experts_per_tok=2, rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=65536,
        qk_norm=None, qkv_bias=False, o_bias=False, norm_topk_prob=True, gate_in_model_dtype=False,
        shared_expert_intermediate_size=None,
    ),
    "qwen3-30b-a3b": dict(
        COMMON, family="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=768,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_local_experts=128,
        num_experts_per_tok=8, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=40960,
        qk_norm="head", qkv_bias=False, o_bias=False, norm_topk_prob=True, gate_in_model_dtype=True,
        shared_expert_intermediate_size=None,
    ),
    "qwen3-235b-a22b": dict(
        COMMON, family="qwen3_moe", vocab_size=151936, hidden_size=4096, intermediate_size=1536,
        num_hidden_layers=94, num_attention_heads=64, num_key_value_heads=4, head_dim=128, num_local_experts=128,
        num_experts_per_tok=8, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=40960,
        qk_norm="head", qkv_bias=False, o_bias=False, norm_topk_prob=True, gate_in_model_dtype=True,
        shared_expert_intermediate_size=None,
    ),
    "olmoe-1b-7b": dict(
        COMMON, family="olmoe", vocab_size=50304, hidden_size=2048, intermediate_size=1024,
        num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16, head_dim=128, num_local_experts=64,
        num_experts_per_tok=8, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
        qk_norm="projection", qkv_bias=False, o_bias=False, norm_topk_prob=False, gate_in_model_dtype=True,
        shared_expert_intermediate_size=None,
    ),
    "qwen1.5-moe-a2.7b": dict(
        COMMON, family="qwen2_moe", vocab_size=151936, hidden_size=2048, intermediate_size=1408,
        num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16, head_dim=128, num_local_experts=60,
        num_experts_per_tok=4, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=8192,
        qk_norm=None, qkv_bias=True, o_bias=False, norm_topk_prob=False, gate_in_model_dtype=True,
        shared_expert_intermediate_size=5632,
    ),
}  # fmt: skip
# The hub files' own spelling of what they name (architectures, model_type, the keys the family
# reads its sizes from).
HUB_KEYS = {
    "mixtral-8x7b": ("MixtralForCausalLM", "mixtral", {"num_local_experts": 8, "intermediate_size": 14336}),
    "mixtral-8x22b": ("MixtralForCausalLM", "mixtral", {"num_local_experts": 8, "intermediate_size": 16384}),
    "qwen3-30b-a3b": ("Qwen3MoeForCausalLM", "qwen3_moe", {
        "num_experts": 128, "moe_intermediate_size": 768, "intermediate_size": 6144, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "attention_bias": False, "use_sliding_window": False}),
    "qwen3-235b-a22b": ("Qwen3MoeForCausalLM", "qwen3_moe", {
        "num_experts": 128, "moe_intermediate_size": 1536, "intermediate_size": 12288, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "attention_bias": False, "use_sliding_window": False}),
    "olmoe-1b-7b": ("OlmoeForCausalLM", "olmoe", {"num_experts": 64, "intermediate_size": 1024, "clip_qkv": None}),
    "qwen1.5-moe-a2.7b": ("Qwen2MoeForCausalLM", "qwen2_moe", {
        "num_experts": 60, "moe_intermediate_size": 1408, "intermediate_size": 5632,
        "shared_expert_intermediate_size": 5632, "decoder_sparse_step": 1, "use_sliding_window": False,
        "sliding_window": 32768}),
}  # fmt: skip
# The model cards' headline totals, in billions: (total, active), embeddings included.
HEADLINE = {
    "mixtral-8x7b": (46.7, 12.9),
    "mixtral-8x22b": (141, 39),
    "qwen3-30b-a3b": (30.5, 3.3),
    "qwen3-235b-a22b": (235, 22),
    "olmoe-1b-7b": (6.9, 1.3),
    "qwen1.5-moe-a2.7b": (14.3, 2.7),
}


def test_every_preset_is_checked_here():
    assert set(BUILTIN_MODELS) == set(PUBLISHED) == set(HUB_KEYS) == set(HEADLINE)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_every_field_is_the_published_one(name):
    config = builtin_model(name)[1]
    assert config.to_dict() == PUBLISHED[name]
    architecture, model_type, keys = HUB_KEYS[name]
    raw = BUILTIN_MODELS[name][1]
    assert raw["architectures"] == [architecture] and raw["model_type"] == model_type
    assert {k: raw[k] for k in keys} == keys


@pytest.mark.parametrize("name", list(HEADLINE))
def test_parameter_totals_are_the_model_cards(name):
    total, active = HEADLINE[name]
    count = parameter_count(builtin_model(name)[1])
    assert count.total / 1e9 == pytest.approx(total, rel=0.02)
    assert count.active / 1e9 == pytest.approx(active, rel=0.02)


def test_qwen3_30b_parameters_by_hand():
    """Every tensor of Qwen3-30B-A3B, counted by hand: the q/k norms per head are in."""
    D, V, L, Dh, H, G, E, K, I = 2048, 151936, 48, 128, 32, 4, 128, 8, 768
    per_layer = (
        D * Dh * (2 * H + 2 * G)  # q, o [4096, 2048] / [2048, 4096]; k, v [512, 2048]
        + 2 * D + 2 * Dh  # input / post-attention norms; q_norm, k_norm [128]
        + E * D  # router
    )
    dense = 2 * V * D + D + L * per_layer  # embeddings, lm_head, final norm
    count = parameter_count(builtin_model("qwen3-30b-a3b")[1])
    assert count.dense == dense == 1_541_093_376
    assert count.total == dense + L * E * 3 * D * I == 30_532_122_624
    assert count.active == dense + L * K * 3 * D * I == 3_353_032_704


def test_qwen1_5_moe_counts_its_shared_expert_as_dense_and_active():
    D, V, L, E, K, I, Is = 2048, 151936, 24, 60, 4, 1408, 5632
    per_layer = (
        4 * D * D + 3 * D  # q, k, v, o [2048, 2048]; q, k, v biases
        + 2 * D + E * D  # norms; router
        + 3 * D * Is + D  # the shared expert and its gate [1, 2048]
    )
    count = parameter_count(builtin_model("qwen1.5-moe-a2.7b")[1])
    assert count.dense == 2 * V * D + D + L * per_layer
    assert count.total == count.dense + L * E * 3 * D * I == 14_315_784_192
    assert count.active == count.dense + L * K * 3 * D * I == 2_689_173_504


def test_olmoe_counts_its_q_k_norms_over_the_whole_projection():
    config = builtin_model("olmoe-1b-7b")[1]
    D, L = 2048, 16
    norms = L * (2 * D + 16 * 128 + 16 * 128) + D  # two norms, q_norm [2048], k_norm [2048]; final norm
    assert dense_bytes(config, torch.bfloat16) == 2 * (2 * 50304 * D + L * (4 * D * D + 64 * D) + norms)


# One nf4 matrix of [out, in]: 4-bit codes (numel / 2 bytes), one fp32 absmax per block of 64
# weights, bitsandbytes' 16-entry fp32 code table; each tensor on a 64-byte boundary (every shape
# here is a multiple of 1024 weights, so nothing pads). Three matrices an expert.
def nf4_expert_bytes(I: int, D: int) -> int:
    n = I * D
    return 3 * (n // 2 + n // 64 * 4 + 16 * 4)


def nf4_dq_expert_bytes(I: int, D: int) -> int:
    """One nf4-dq expert (the format of --expert-bits 4): three matrices of bitsandbytes'
    double-quantized nf4, each tensor and matrix on a 64-byte boundary (tests.test_kv_plan's
    nf4_dq_matrix: the code table, nested absmax, nested map, offset, uint8 absmax, codes)."""
    return 3 * nf4_dq_matrix(I, D, 64)


@pytest.mark.parametrize(
    "name, expert",
    [
        ("qwen3-30b-a3b", 2_654_400),  # 3 x 768 x 2048 x 0.5 B = 2.25 MiB + 0.28 MiB of absmax
        ("qwen3-235b-a22b", 10_616_832 + 192),
        ("olmoe-1b-7b", 3_538_944 + 192),
        ("qwen1.5-moe-a2.7b", 4_866_048 + 192),
        ("mixtral-8x7b", 99_090_624),  # FACTS.md's measured figure
    ],
)
def test_one_4bit_expert_record_by_hand(name, expert):
    config = builtin_model(name)[1]
    I, D = config.intermediate_size, config.hidden_size
    assert nf4_expert_bytes(I, D) == expert
    assert RecordLayout.for_config(config, "nf4").nbytes == expert
    # nf4-dq: a uint8 absmax code a block instead of fp32, 8% smaller (plus the nested state)
    assert RecordLayout.for_config(config, "nf4-dq").nbytes == nf4_dq_expert_bytes(I, D)
    assert 0.91 < nf4_dq_expert_bytes(I, D) / expert < 0.925


# ---- offload info for every preset ------------------------------------------------------------


def cli_app() -> typer.Typer:
    from cli.main import app

    if any(c.name == "info" for c in app.registered_commands):
        return app
    app = typer.Typer()
    app.callback()(lambda: None)
    app.command("info")(info_command)
    return app


def info(*args: str):
    return CliRunner().invoke(cli_app(), ["info", *args])


CARDS = {  # a card each preset fits at 4 bits
    "mixtral-8x7b": "12GiB", "mixtral-8x22b": "48GiB", "qwen3-30b-a3b": "8GiB", "qwen3-235b-a22b": "48GiB",
    "olmoe-1b-7b": "8GiB", "qwen1.5-moe-a2.7b": "8GiB",
}  # fmt: skip


@pytest.mark.parametrize("name", list(CARDS))
def test_info_plans_and_estimates_every_preset(name):
    config = builtin_model(name)[1]
    L, E, K = config.num_hidden_layers, config.num_local_experts, config.num_experts_per_tok
    result = info(name, "--vram", CARDS[name], "--expert-bits", "4", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["family"] == PUBLISHED[name]["family"]
    assert out["parameters"] == {"total": parameter_count(config).total, "active": parameter_count(config).active}
    assert out["expert_format"] == "nf4-dq"
    assert out["expert_bytes"] == nf4_dq_expert_bytes(config.intermediate_size, config.hidden_size)
    assert out["dense_bytes"] == dense_bytes(config, torch.bfloat16)  # bf16 attention: every dense weight in bf16
    # every preset's lm_head is untied: on a card its V x D bf16 input table stays in host RAM
    assert not config.tie_word_embeddings and out["embeddings_on_host"]
    device_dense = out["dense_bytes"] - config.vocab_size * config.hidden_size * 2
    assert out["device_dense_bytes"] == device_dense
    assert out["experts_total"] == L * E and len(out["layer_slots"]) == L
    assert K <= out["slots_per_layer"] <= E and out["device_bytes"] <= out["vram_bytes"]
    assert out["min_vram_bytes"] == (device_dense + out["kv_cache_bytes"] + L * K * out["expert_bytes"]
                                     + out["reserve_bytes"])
    assert out["estimate"]["tokens_per_s"] > 0
    text = info(name, "--vram", CARDS[name], "--expert-bits", "4")
    assert text.exit_code == 0, text.output
    assert f"({config.family}, " in text.stdout and f"top-{K} of {E} experts a layer" in text.stdout
    assert text.stdout.strip().splitlines()[-1].startswith("estimate: ")


def test_info_shows_qwen1_5s_shared_expert_as_dense():
    result = info("qwen1.5-moe-a2.7b", "--vram", "8GiB", "--expert-bits", "4", "--json")
    out = json.loads(result.stdout)
    assert out["dense_bytes_by_class"]["shared_experts"] == 24 * (3 * 2048 * 5632 + 2048) * 2  # bf16
    assert out["dense_bytes_by_class"]["attention"] == 24 * (4 * 2048 * 2048 + 3 * 2048) * 2  # with q, k, v biases
    text = info("qwen1.5-moe-a2.7b", "--vram", "8GiB", "--expert-bits", "4").stdout
    assert "\nshared experts " in text
    assert "shared experts" not in info("qwen3-30b-a3b", "--vram", "8GiB", "--expert-bits", "4").stdout


# Per layer, resident bf16 on a CPU at position 0 with no overhead: the weights one token reads,
# by hand (attention, router, norms, biases, the top-k routed experts of their own width, and
# Qwen1.5's shared expert), at 2 bytes each.
TOKEN_PARAMS_PER_LAYER = {
    "qwen3-30b-a3b": 2048 * 128 * 72 + 128 * 2048 + 2 * 2048 + 2 * 128 + 8 * 3 * 2048 * 768,  # 56,889,600
    "olmoe-1b-7b": 4 * 2048**2 + 64 * 2048 + 4 * 2048 + 8 * 3 * 2048 * 1024,
    "qwen1.5-moe-a2.7b": (4 * 2048**2 + 3 * 2048 + 60 * 2048 + 2 * 2048 + 4 * 3 * 2048 * 1408
                          + 3 * 2048 * 5632 + 2048),  # 86,118,400
}  # fmt: skip


@pytest.mark.parametrize("name", list(TOKEN_PARAMS_PER_LAYER))
def test_the_estimate_reads_top_k_routed_experts_and_the_shared_expert(name):
    config = builtin_model(name)[1]
    plan = plan_model(name, config, torch.bfloat16, 256, "bf16", "bf16", device_type="cpu",
                      experts_per_layer=config.num_local_experts)
    machine = Machine("cpu", mem_gbps=100.0, efficiency=0.5, layer_overhead_s=0.0)
    got = estimate_plan(plan, machine, position=0, cpu_experts="off")
    bandwidth = 50e9
    assert TOKEN_PARAMS_PER_LAYER["qwen3-30b-a3b"] == 56_889_600
    assert TOKEN_PARAMS_PER_LAYER["qwen1.5-moe-a2.7b"] == 86_118_400
    layer = TOKEN_PARAMS_PER_LAYER[name] * 2 / bandwidth
    head = (config.vocab_size * 2048 + 2048) * 2 / bandwidth  # lm_head and the final norm
    assert got.layers[0].compute_s == pytest.approx(layer, rel=1e-9)
    assert got.seconds_per_token == pytest.approx(head + config.num_hidden_layers * layer, rel=1e-9)
    assert got.misses_per_token == 0


# ---- synthetic packs of the new families --------------------------------------------------------


def test_every_presets_vocabulary_fits_the_synthetic_tokenizer():
    for name, (_, raw) in BUILTIN_MODELS.items():
        assert _tokenizer_pieces() <= raw["vocab_size"] <= MAX_SYNTH_VOCAB, name


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "qwen1.5-moe-a2.7b", "olmoe-1b-7b"])
def test_a_synthetic_pack_of_each_family_holds_its_whole_tensor_table(name, tmp_path):
    """The preset's layers at their true widths, 1 layer, its vocabulary cut to the bundled
    tokenizer's pieces so the test stays quick (the full vocabulary is the CLI test below)."""
    raw = dict(BUILTIN_MODELS[name][1], vocab_size=_tokenizer_pieces())
    out = synthesize(raw, tmp_path / "pack", layers=1, expert_bits=4, seed=1)
    with Pack(out) as pack:
        c = pack.config
        assert c.family == PUBLISHED[name]["family"] and c.num_hidden_layers == 1
        assert c.intermediate_size == PUBLISHED[name]["intermediate_size"]
        table = layer_table(c)
        for key, (_, shape_of) in table.items():
            w = pack.dense(key, 0)
            assert tuple(w.shape) == shape_of(c), key
            w = w.float()
            assert torch.isfinite(w).all(), key
            if key.endswith("_bias"):
                assert w.abs().max() < 0.2 and abs(w.mean()) < 0.01, key  # small, about 0
            elif key.endswith("norm"):
                assert abs(w.mean() - 1) < 0.05, key  # norms about 1
        for key in {"qwen3-30b-a3b": ("q_norm", "k_norm"), "olmoe-1b-7b": ("q_norm", "k_norm"),
                    "qwen1.5-moe-a2.7b": ("q_bias", "k_bias", "v_bias", "shared_w1", "shared_w3", "shared_w2",
                                          "shared_gate")}[name]:
            assert key in table
        assert pack.layout.fmt.name == "nf4-dq"  # --expert-bits 4
        assert len(pack.layout.matrices) == 3 and pack.layout.nbytes == nf4_dq_expert_bytes(c.intermediate_size, 2048)
        pack.expert(0, c.num_local_experts - 1)  # the last record reads


@pytest.mark.slow  # 1 GB of embeddings and experts: ~5 s on two cores
def test_cli_synth_writes_olmoe_at_its_full_vocabulary(tmp_path):
    from cli.synth import synth_command
    from offload.tokenizer import Tokenizer

    app = typer.Typer()
    app.callback()(lambda: None)
    app.command("synth")(synth_command)
    out = tmp_path / "olmoe"
    result = CliRunner().invoke(app, ["synth", "olmoe-1b-7b", str(out), "--layers", "1", "--expert-bits", "4"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"wrote {out}: synthetic olmoe-1b-7b, 1 of 16 layers, 64 experts (nf4-dq,")
    with Pack(out) as pack:
        assert pack.config.vocab_size == 50304 and pack.config.family == "olmoe"
        assert tuple(pack.dense("embed_tokens").shape) == (50304, 2048)
        assert tuple(pack.dense("q_norm", 0).shape) == (2048,)
    assert Tokenizer.from_dir(out).vocab_size == 50304  # grown to the preset's vocabulary


def test_dense_mlp_layers_are_dense_weights_with_no_experts():
    """Qwen3-30B-A3B with layers 0 and 47 dense (mlp_only_layers, as Qwen's configs allow): those
    layers lose their router and experts and gain an FFN of intermediate_size (6144), counted
    as dense, planned without slots and estimated without loads."""
    from offload.config import ModelConfig

    raw = dict(BUILTIN_MODELS["qwen3-30b-a3b"][1], mlp_only_layers=[0, 47])
    config = ModelConfig.from_dict(raw, source="test")
    base = parameter_count(builtin_model("qwen3-30b-a3b")[1])
    count = parameter_count(config)
    assert count.dense == base.dense - 2 * 128 * 2048 + 2 * 3 * 2048 * 6144  # no routers; two FFNs
    assert count.total == count.dense + 46 * 128 * 3 * 2048 * 768
    plan = plan_model("x", config, torch.bfloat16, 256, "bf16", "bf16", device_type="cpu", experts_per_layer=128)
    assert len(plan.memory.layer_slots) == 46 and plan.memory.experts_total == 46 * 128
    machine = Machine("cpu", mem_gbps=100.0, efficiency=0.5, layer_overhead_s=0.0)
    got = estimate_plan(plan, machine, position=0, cpu_experts="off")
    bandwidth = 50e9
    dense_layer = (2048 * 128 * 72 + 2 * 2048 + 2 * 128 + 3 * 2048 * 6144) * 2 / bandwidth  # attention, norms, FFN
    moe_layer = TOKEN_PARAMS_PER_LAYER["qwen3-30b-a3b"] * 2 / bandwidth
    head = (151936 * 2048 + 2048) * 2 / bandwidth
    assert len(got.layers) == 46 and got.dense_layers_s == pytest.approx(2 * dense_layer, rel=1e-9)
    assert got.seconds_per_token == pytest.approx(head + 2 * dense_layer + 46 * moe_layer, rel=1e-9)
