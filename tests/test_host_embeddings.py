"""The input embeddings in host RAM on a card (offload.plan.embeddings_on_host), the parts a CPU
can check: the RAM the host tier may take, where token ids go in, and the lookup itself. The
CUDA run (the table really in RAM, the same logits as with it on the card) is in test_gpu.py.
"""

from __future__ import annotations

import types

import torch

from offload import loader
from offload.config import ModelConfig
from offload.model import DenseWeights
from offload.plan import BUILTIN_MODELS

GiB = 2**30


def _mixtral(**overrides) -> ModelConfig:
    return ModelConfig.from_dict(dict(BUILTIN_MODELS["mixtral-8x7b"][1], **overrides))


def test_spare_ram_on_a_card_leaves_room_for_an_untied_table(monkeypatch):
    """With 100 GiB available the tier may take 80 GiB; on a card, less Mixtral's 32000 x 4096
    bf16 table when it stays in RAM (untied), the whole of it when tied (it is lm_head there)."""
    monkeypatch.setattr(loader.psutil, "virtual_memory", lambda: types.SimpleNamespace(available=100 * GiB))
    table = 32000 * 4096 * 2
    cuda = torch.device("cuda")
    assert loader.spare_ram(cuda, _mixtral(), torch.bfloat16) == int(80 * GiB) - table
    assert loader.spare_ram(cuda, _mixtral(tie_word_embeddings=True), torch.bfloat16) == int(80 * GiB)


def test_the_lookup_gathers_rows_where_the_table_is():
    """DenseWeights.embed: the table's rows for the ids, on the compute device (here both the CPU)."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(50, 8, generator=g)
    dense = DenseWeights(embed_tokens=table, norm=torch.ones(8), lm_head=table, layers=[])
    ids = torch.tensor([3, 0, 49, 3])
    got = dense.embed(ids)
    assert torch.equal(got, table[[3, 0, 49, 3]])
    assert dense.device == dense.token_device == torch.device("cpu")

