"""Quantized weights inside the model: accuracy against the unquantized model, and exactness.

Accuracy is measured as next-token KL divergence (nats per token) from the fp32 demo model over
a fixed 256-token stretch of its held-out text. Measured when these bounds were set: int8
experts 8e-5, nf4 experts 0.051, fp4 0.057, int8 attention 8e-5, nf4 attention 0.005; each
bound leaves about 2x room.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from offload import quant
from offload.demo import DEMO_MODEL_DIR
from offload.engine import Engine, GenerationSettings
from offload.errors import SettingError
from tests.model_builder import WIDE

TEXT = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "python-docs-valid.txt"

KL_BOUNDS = [
    (dict(expert_bits=8), 1e-3),
    (dict(expert_bits=4), 0.1),
    (dict(expert_format="nf4-dq"), 0.1),
    (dict(expert_format="fp4"), 0.12),
    (dict(attn_bits=8), 1e-3),
    (dict(attn_bits=4), 0.02),
    (dict(expert_bits=4, attn_bits=4), 0.12),
]


@pytest.fixture(scope="module")
def reference():
    engine = Engine.load(DEMO_MODEL_DIR, device="cpu", dtype="float32")
    ids = engine.tokenizer.encode(TEXT.read_text(encoding="utf-8")[5000:12000], bos=True)[:256]
    assert len(ids) == 256
    return ids, engine.logits(ids).log_softmax(-1)


@pytest.mark.parametrize("settings, bound", KL_BOUNDS, ids=lambda v: str(v))
def test_next_token_kl_divergence_is_bounded(settings, bound, reference):
    ids, ref = reference
    engine = Engine.load(DEMO_MODEL_DIR, device="cpu", dtype="float32", **settings)
    logp = engine.logits(ids).float().log_softmax(-1)
    kl = (ref.exp() * (ref - logp)).sum(-1).mean().item()
    assert 0 < kl <= bound  # > 0: the weights really were quantized


def test_bits_choose_formats():
    assert quant.format_for_bits(16, torch.bfloat16, "cpu").name == "bf16"
    assert quant.format_for_bits(16, torch.float32, "cuda").name == "fp32"
    assert quant.format_for_bits(8, torch.bfloat16, "cuda").name == "int8"
    assert quant.format_for_bits(4, torch.bfloat16, "cuda").name == "nf4"
    # a shape the fused CPU layout cannot hold falls back to the portable layout
    assert quant.format_for_bits(4, torch.bfloat16, "cpu", ((256, 160),)).name == "nf4"
    assert quant.format_for_bits(4, torch.bfloat16, "cpu", ((128, 256),)).name in ("nf4", "nf4-cpu")
    with pytest.raises(SettingError, match="bits 5"):
        quant.format_for_bits(5, torch.bfloat16, "cpu")


def test_quantized_attention_and_experts_through_the_cache_are_bit_identical(model_dirs):
    path = model_dirs[WIDE.name]
    settings = dict(device="cpu", dtype="bfloat16", attn_bits=8, expert_format="nf4")
    ref = Engine.load(path, **settings)
    assert isinstance(ref.model.dense.layers[0].q_proj, quant.QuantizedMatrix)
    engine = Engine.load(path, experts_per_layer=4, ram=0, **settings)
    ids = ref.tokenizer.encode("def parse_args(argv):\n    return", bos=True)
    run = GenerationSettings(max_new_tokens=10, ignore_eos=True)
    assert engine.generate(ids, run).run().tokens == ref.generate(ids, run).run().tokens
    assert torch.equal(engine.logits(ids), ref.logits(ids))
    with pytest.raises(SettingError, match="not both"):
        Engine.load(path, device="cpu", expert_bits=4, expert_format="nf4")


def test_the_device_budget_counts_quantized_attention(model_dirs):
    """--attn-bits shrinks the dense weights the --vram budget must hold, so the same budget
    leaves room for more expert slots."""
    from offload.plan import dense_bytes

    path = model_dirs[WIDE.name]
    plain = Engine.load(path, device="cpu", dtype="float32", experts_per_layer=3, policy="lru")
    c, record = plain.config, plain.cache.layout.nbytes
    budget = plain.plan.dense_bytes + plain.plan.kv_cache_bytes + c.num_hidden_layers * 4 * record
    assert plain.plan.dense_bytes == dense_bytes(c, torch.float32)
    full = Engine.load(path, device="cpu", dtype="float32", vram=budget, policy="lru")
    small = Engine.load(path, device="cpu", dtype="float32", vram=budget, attn_bits=4, policy="lru")
    assert full.plan.slots_per_layer == 4
    assert small.plan.dense_bytes < full.plan.dense_bytes
    assert small.plan.slots_per_layer >= full.plan.slots_per_layer
