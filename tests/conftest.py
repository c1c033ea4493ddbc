"""Shared fixtures: tiny Mixtral checkpoints on disk and their transformers reference models."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.model_builder import SHAPES, WINDOWED, write_tiny_mixtral

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """shape name -> a hub-layout checkpoint directory (sharded, with an index and a tokenizer)."""
    root = tmp_path_factory.mktemp("models")
    return {shape.name: write_tiny_mixtral(root / shape.name, shape) for shape in SHAPES}


@pytest.fixture(scope="session")
def references(model_dirs) -> dict[str, torch.nn.Module]:
    """shape name -> transformers' own load of that checkpoint, fp32, eval mode."""
    from transformers import MixtralForCausalLM

    return {
        name: MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        for name, path in model_dirs.items()
    }


@pytest.fixture(scope="session")
def packs(model_dirs, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """(shape name, dtype name) -> an offload pack converted from that fixture checkpoint."""
    from offload.pack import convert

    root = tmp_path_factory.mktemp("packs")
    return {
        (shape.name, name): convert(model_dirs[shape.name], root / f"{shape.name}-{name}", dtype=dtype)
        for shape in SHAPES
        for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))
    }


@pytest.fixture
def model_copy(model_dirs, tmp_path) -> Path:
    """A private copy of the windowed checkpoint that a test may damage."""
    dest = tmp_path / "model"
    shutil.copytree(model_dirs[WINDOWED.name], dest)
    return dest
