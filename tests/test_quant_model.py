"""Quantized weights inside the model: accuracy against the unquantized model, and exactness.

Accuracy is measured as next-token KL divergence (nats per token) from the fp32 demo model over
a fixed 256-token stretch of its held-out text. Measured when these bounds were set: int8
experts 8.1e-5, nf4 experts 5.1e-3, nf4-dq 5.0e-3, fp4 4.6e-3, int8 attention 7.8e-5, nf4
attention 5.4e-3, nf4 both 8.0e-3, the same through offload's CPU 4-bit kernel and through
dequantize + matmul; each bound leaves about 2x room. (The 4-bit experts measured 0.051 before
``quant.dequantize`` stopped using bitsandbytes' native CPU dequantizer for the demo's w2
[256, 160], whose rows are not whole blocks of 64: that dequantizer numbered the blocks by
row, so w2 ran on the wrong scales.)
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
    (dict(expert_bits=4), 0.012),
    (dict(expert_format="nf4-dq"), 0.012),
    (dict(expert_format="fp4"), 0.012),
    (dict(attn_bits=8), 1e-3),
    (dict(attn_bits=4), 0.012),
    (dict(expert_bits=4, attn_bits=4), 0.02),
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
    # 4 bits: bitsandbytes' double-quantized nf4 (its Linear4bit default, compress_statistics=True)
    four = quant.format_for_bits(4, torch.bfloat16, "cuda")
    assert four.name == "nf4-dq" and four.kind == "4bit" and four.quant_type == "nf4" and four.double_quant
    # one record format for both devices: the CPU's 4-bit kernel reads the portable layout too
    assert quant.format_for_bits(4, torch.bfloat16, "cpu", ((256, 160),)).name == "nf4-dq"
    assert quant.format_for_bits(4, torch.bfloat16, "cpu", ((128, 256),)).name == "nf4-dq"
    assert quant.format_for_bits(4, torch.float32, "cpu").name == "nf4-dq"
    # 4.13 bits a weight against plain nf4's 4.5, by hand for a 14336 x 4096 matrix: 4 bits of code,
    # 8 bits of absmax code a block of 64, 32 bits of nested absmax per 256 blocks, the maps and offset
    n = 14336 * 4096
    assert four.bits_per_weight((14336, 4096)) == pytest.approx(
        8 * (n // 2 + n // 64 + n // 64 // 256 * 4 + (16 + 256 + 1) * 4) / n)
    assert quant.get_format("nf4").bits_per_weight((14336, 4096)) == pytest.approx(8 * (n // 2 + n // 64 * 4 + 64) / n)
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


# ---- packs that store quantized weights ---------------------------------------------------------


def no_quantizing(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("loading a pack quantized something")

    monkeypatch.setattr(quant, "quantize", refuse)
    monkeypatch.setattr("offload.loader.quantize", refuse)


@pytest.mark.parametrize(
    "model, bits",
    [("wide", dict(attn_bits=8, expert_bits=4)), ("demo", dict(attn_bits=4, expert_bits=8))],
    ids=["wide int8 attention nf4 experts", "demo 4-bit attention int8 experts"],
)
def test_a_quantized_pack_gives_the_checkpoints_logits_bit_for_bit(model, bits, model_dirs, tmp_path, monkeypatch):
    """convert --attn-bits/--expert-bits, then a load that quantizes nothing, gives exactly the
    logits of loading the checkpoint with the same bits (the pack is for this CPU: its 4-bit
    layout and its quantizer are the load's)."""
    from offload.pack import convert

    src = DEMO_MODEL_DIR if model == "demo" else model_dirs[WIDE.name]
    dtype = "bfloat16" if model == "demo" else "float32"
    ref = Engine.load(src, device="cpu", dtype=dtype, **bits)
    pack = convert(src, tmp_path / "pack", target="cpu", **bits)
    ids = ref.tokenizer.encode("def parse_args(argv):\n    return", bos=True)
    want = ref.logits(ids)
    no_quantizing(monkeypatch)
    resident = Engine.load(pack, device="cpu", dtype=dtype)
    cached = Engine.load(pack, device="cpu", dtype=dtype, experts_per_layer=ref.config.num_experts_per_tok, ram=0)
    for engine in (resident, cached):
        q = engine.model.dense.layers[0].q_proj
        assert isinstance(q, quant.QuantizedMatrix) and q.fmt == ref.model.dense.layers[0].q_proj.fmt
        assert torch.equal(engine.logits(ids), want)
    same_bits = Engine.load(pack, device="cpu", dtype=dtype, **bits)  # agreeing flags are fine
    assert torch.equal(same_bits.logits(ids), want)
    cached.close()


def test_flags_that_disagree_with_a_pack_are_refused_naming_both(model_dirs, tmp_path):
    from offload.pack import convert

    src = model_dirs[WIDE.name]
    quantized = convert(src, tmp_path / "q", attn_bits=8, expert_bits=4, target="cpu")
    plain = convert(src, tmp_path / "plain", dtype=torch.bfloat16)
    cases = [
        (quantized, dict(attn_bits=4), rf"--attn-bits 4: {quantized} holds int8 attention"),
        (quantized, dict(attn_bits=16), rf"--attn-bits 16: {quantized} holds int8 attention"),
        (quantized, dict(expert_bits=8), rf"--expert-bits 8: {quantized} holds nf4-dq experts"),
        (quantized, dict(expert_bits=16), rf"--expert-bits 16: {quantized} holds nf4-dq experts"),
        (plain, dict(expert_bits=4), rf"--expert-bits 4: {plain} holds bf16 experts"),
        (plain, dict(expert_bits=5), r"--expert-bits 5: choose one of 4, 8, 16"),
    ]
    for pack, flags, message in cases:
        with pytest.raises(SettingError, match=message) as error:
            Engine.load(pack, device="cpu", **flags)
        assert "\n" not in str(error.value)
    # a pack with 16-bit attention is quantized on load like a checkpoint, when asked
    engine = Engine.load(plain, device="cpu", attn_bits=8, expert_bits=16)
    assert engine.model.dense.layers[0].q_proj.fmt.name == "int8"


def test_a_cpu_layout_pack_is_refused_on_cuda_before_touching_it(tmp_path, monkeypatch):
    from offload.loader import weight_formats
    from offload.pack import Pack, convert

    pack_dir = convert(DEMO_MODEL_DIR, tmp_path / "pack", attn_format="nf4-cpu", expert_format="int8", target="cpu")
    for name in ("is_available", "device_count", "current_device", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: pytest.fail("touched CUDA"))
    with Pack(pack_dir) as pack:
        with pytest.raises(SettingError) as error:
            weight_formats(pack, torch.device("cuda"), None, None, None, None)
        dtype, layout, attn = weight_formats(pack, torch.device("cpu"), None, None, None, None)  # fine on a CPU
        assert attn.name == "nf4-cpu" and layout.fmt.name == "int8"
    message = str(error.value)
    assert message.startswith(f"--device cuda: {pack_dir} holds nf4-cpu attention in the layout of bitsandbytes' fused CPU kernel")
    assert "CUDA cannot run" in message and "\n" not in message
    assert message.endswith("`offload convert HF_DIR OUT_DIR --expert-format int8 --attn-bits 4 --for cuda`")


@pytest.mark.gpu
def test_on_cuda_quantization_runs_there_and_the_cache_matches_the_resident_experts(model_dirs, tmp_path):
    """Experts quantized on the GPU by CheckpointRecords are the resident experts' bytes; a pack
    converted --for cuda on this GPU gives the logits of loading the checkpoint here."""
    from offload.checkpoint import Checkpoint
    from offload.experts.record import RecordLayout
    from offload.experts.tiers import CheckpointRecords
    from offload.loader import load_resident_experts
    from offload.pack import convert

    src = model_dirs[WIDE.name]
    device = torch.device("cuda")
    for fmt in ("int8", "nf4", "nf4-dq"):
        with Checkpoint(src) as ck:
            layout = RecordLayout.for_config(ck.config, fmt)
            resident = load_resident_experts(ck, layout, device, torch.bfloat16, None)
            record = torch.zeros(layout.stride, dtype=torch.uint8)
            CheckpointRecords(ck, layout, device).read_record(1, 5, record)
            for got, want in zip(layout.views(record), resident.experts[1][5]):
                assert want.device.type == "cuda"
                for name, tensor in want.tensors.items():
                    assert torch.equal(got.tensors[name], tensor.cpu()), (fmt, name)
    ref = Engine.load(src, device="cuda", dtype="bfloat16", attn_bits=8, expert_bits=4)
    pack = convert(src, tmp_path / "pack", attn_bits=8, expert_bits=4, target="cuda")
    engine = Engine.load(pack, device="cuda", dtype="bfloat16")
    ids = ref.tokenizer.encode("def parse_args(argv):\n    return", bos=True)
    assert torch.equal(engine.logits(ids), ref.logits(ids))
