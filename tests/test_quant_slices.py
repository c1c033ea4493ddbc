"""A prompt chunk's 4-bit matmul dequantizes its weight a slice of rows at a time
(offload.quant.linear_4bit_in_slices), so the runtime reserve holds one slice, not one matrix.

Oracles: bitsandbytes' (and offload's) dequantization of the whole matrix, and the float
product with it; the slice sizes by hand from the block layout.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from offload import quant
from offload.plan import BUILTIN_MODELS, runtime_reserve
from offload.config import ModelConfig

FOUR_BIT = ("nf4", "nf4-dq", "fp4", "fp4-dq")
# (out, in): rows of whole blocks; rows that straddle blocks (in 96, 160, 224); a nested block
# of 256 blocks that spans many rows (in 96: 512 rows a nested block)
SHAPES = ((256, 4096), (1200, 96), (640, 160), (130, 224))


def _weight(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("fmt", FOUR_BIT)
@pytest.mark.parametrize("shape", SHAPES)
def test_a_slice_dequantizes_to_the_wholes_rows_exactly(fmt, shape):
    qm = quant.quantize(_weight(shape), fmt)
    whole = quant.dequantize(qm, torch.float32)  # [Out, In]
    step = quant.slice_rows_step(shape, qm.fmt)
    bounds = list(range(0, shape[0], step))[:4] + [shape[0]]
    for first, end in zip(bounds, bounds[1:]):
        part = quant.slice_rows(qm, first, end)
        assert part.shape == (end - first, shape[1])
        assert torch.equal(quant.dequantize(part, torch.float32), whole[first:end])
    # the last slice may end at the last row whatever the step
    first = bounds[-2]
    assert torch.equal(quant.dequantize(quant.slice_rows(qm, first, shape[0]), torch.float32), whole[first:])


@pytest.mark.parametrize("fmt", FOUR_BIT)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_product_in_slices_is_the_product_with_the_whole_weight(fmt, shape, dtype):
    qm = quant.quantize(_weight(shape), fmt)
    x = torch.randn(7, shape[1], generator=torch.Generator().manual_seed(1)).to(dtype)  # [N, In]
    want = F.linear(x, quant.dequantize(qm, dtype))  # [N, Out]
    step = quant.slice_rows_step(shape, qm.fmt)
    small = step * shape[1] * x.element_size()  # one step of rows a slice: the most slices
    got = quant.linear_4bit_in_slices(x, qm, slice_bytes=small)
    assert got.shape == want.shape and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert (got.float() - want.float()).abs().max() <= tol * want.float().abs().max()


def test_slices_must_start_on_whole_blocks():
    qm = quant.quantize(_weight((640, 160)), "nf4-dq")
    step = quant.slice_rows_step((640, 160), qm.fmt)
    assert step == 16384 // 32  # 64 x 256 weights a nested block, in 160: gcd 32
    with pytest.raises(ValueError, match="not a slice of whole blocks"):
        quant.slice_rows(qm, 1, 640)
    with pytest.raises(ValueError, match="not a slice of whole blocks"):
        quant.slice_rows(quant.quantize(_weight((640, 160)), "nf4"), 0, 3)  # 3 x 160 is not whole blocks


def test_mixtrals_slices_and_the_reserve_term_by_hand():
    """w1 [14336, 4096] in bf16: 4096 rows of 8 KiB = 32 MiB; w2 [4096, 14336]: 28 KiB rows, the
    most under 32 MiB in steps of 8 rows (16384 / gcd(16384, 14336) = 8) is 1168. The reserve's
    "dequantized weight" term on nf4-dq experts and attention is the larger: 32 MiB."""
    MiB = 2**20
    assert quant.dequantized_slice_bytes((14336, 4096), "nf4-dq", torch.bfloat16) == 4096 * 4096 * 2 == 32 * MiB
    assert quant.slice_rows_step((4096, 14336), quant.get_format("nf4-dq")) == 8
    assert quant.dequantized_slice_bytes((4096, 14336), "nf4-dq", torch.bfloat16) == 1168 * 14336 * 2
    assert quant.dequantized_slice_bytes((64, 4096), "nf4", torch.bfloat16) == 64 * 4096 * 2  # smaller than a slice
    config = ModelConfig.from_dict(BUILTIN_MODELS["mixtral-8x7b"][1])
    reserve = runtime_reserve(config, torch.bfloat16, "nf4-dq", "nf4-dq", "cuda", context=4096)
    term = {t.name: t.nbytes for t in reserve.terms}["dequantized weight"]
    assert term == 32 * MiB
    int8 = runtime_reserve(config, torch.bfloat16, "int8", "nf4-dq", "cuda", context=4096)
    assert {t.name: t.nbytes for t in int8.terms}["dequantized weight"] == 14336 * 4096 * 2  # int8: the whole cast
