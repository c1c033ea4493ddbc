"""The bundled demo model: present, small, the default, and exact against transformers."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from cli.main import app
from offload.config import ModelConfig
from offload.demo import DEMO_MODEL_DIR
from offload.engine import Engine

TEXT = "The :mod:`argparse` module makes it easy to write user-friendly command-line interfaces."


def test_demo_model_is_a_small_mixtral():
    config = ModelConfig.from_dir(DEMO_MODEL_DIR)
    assert (config.num_local_experts, config.num_experts_per_tok) == (8, 2)
    assert config.num_hidden_layers >= 4 and 2000 <= config.vocab_size <= 8000
    size = sum(f.stat().st_size for f in DEMO_MODEL_DIR.iterdir())
    assert size <= 25 * 1024 * 1024
    assert (DEMO_MODEL_DIR / "model.safetensors.index.json").is_file()  # the hub layout, sharded


def test_demo_logits_match_transformers_in_fp32():
    from transformers import MixtralForCausalLM

    engine = Engine.load(DEMO_MODEL_DIR, device="cpu", dtype="float32")
    ids = engine.tokenizer.encode(TEXT, bos=True)
    reference = MixtralForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = reference(torch.tensor([ids])).logits[0]
    ours = engine.logits(ids)
    assert (ours - theirs).abs().max().item() <= 1e-4
    # a trained model: the text is far more likely than under a uniform guess
    nll = torch.nn.functional.cross_entropy(ours[:-1], torch.tensor(ids[1:]))
    assert nll.item() < 0.5 * torch.log(torch.tensor(float(engine.config.vocab_size))).item()


def test_generate_defaults_to_the_demo_model():
    result = CliRunner().invoke(app, ["generate", "-p", "The os module", "-n", "8", "--json", "--seed", "1"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["model"] == str(DEMO_MODEL_DIR) and len(out["tokens"]) >= 1
