"""offload's CPU 4-bit kernel on double-quantized matrices (nf4-dq, fp4-dq) where bitsandbytes'
nested blocks (256 blocks of 64 weights, one fp32 absmax each) do not line up with the rows: a
row of In = 14336 is 224 blocks, so most rows straddle two nested blocks (the SIMD paths run a
row in spans of one nested block); In = 19200 (300 blocks) spans up to three; and Out * In / 64
is no multiple of 256, so the last nested block is partial.

Two checks per path: against the float oracle (bitsandbytes' dequantization, then a float64
matmul) within the bounds of tests/test_cpu_kernel.py; and bit for bit against the same path on
the same codes with fp32 absmax, the absmax decoded here as the kernel must decode it. The SIMD
paths decode a block's absmax with one rounding, fma(nested_map[code], nested_absmax[b / 256],
nested_offset) (computed here exactly, in fractions); the portable path as bitsandbytes does,
the product rounded, then the offset added (or with one rounding, where the compiler contracts
it into an fma). So a wrong nested block, span end or code anywhere gives other bits.
"""

from __future__ import annotations

import fractions

import pytest
import torch

from offload.kernels import cpu4
from tests.test_cpu_kernel import SIMD_BOUND, activations, bound, matrix, needs, oracle_weight, row_errors

DQ_FORMATS = ["nf4-dq", "fp4-dq"]
# [Out, In]: blocks a row 224 (straddling), 300 (three nested blocks), 65 and 257 (odd counts)
STRADDLING = [(37, 14336), (23, 19200), (53, 4160), (29, 16448)]
ROWS = [1, 2, 3, 4, 5, 8, 16, cpu4.MAX_ROWS]


def test_the_shapes_straddle_nested_blocks():
    for out_f, in_f in STRADDLING:
        blocks = in_f // 64
        assert in_f % 64 == 0 and 256 % blocks and blocks % 256 and (out_f * blocks) % 256


def round_f32(q: fractions.Fraction) -> float:
    """q rounded to the nearest fp32, ties to even (exactly)."""
    r = torch.tensor(float(q), dtype=torch.float32)  # within one fp32 step of the answer
    candidates = [r, torch.nextafter(r, torch.tensor(-float("inf"))), torch.nextafter(r, torch.tensor(float("inf")))]

    def key(c: torch.Tensor):  # nearest first, then the even significand
        return abs(fractions.Fraction(c.item()) - q), c.view(torch.int32).item() & 1

    return min(candidates, key=key).item()


def decoded_absmax(tensors, fused: bool) -> torch.Tensor:
    """[B] fp32: each block's absmax from its double quantization, with one rounding (fused)
    or as bitsandbytes computes it (the product rounded to fp32, then the offset added)."""
    codes = tensors["absmax"].long()  # [B]
    nmap, nabs = tensors["nested_quant_map"].float(), tensors["nested_absmax"].float()
    offset = tensors["nested_offset"].float()
    nested = nabs[torch.arange(codes.numel()) // 256]  # [B]
    if not fused:
        return nmap[codes] * nested + offset  # two fp32 roundings (torch's CPU ops are IEEE)
    cache: dict[tuple[int, int], float] = {}
    off = fractions.Fraction(offset.item())
    out = []
    for c, j in zip(codes.tolist(), (torch.arange(codes.numel()) // 256).tolist()):
        key = (c, j)
        if key not in cache:
            cache[key] = round_f32(fractions.Fraction(nmap[c].item()) * fractions.Fraction(nabs[j].item()) + off)
        out.append(cache[key])
    return torch.tensor(out, dtype=torch.float32)


def plain(tensors, absmax: torch.Tensor) -> dict:
    """The same codes as a single-quantized matrix with this fp32 absmax."""
    return {"data": tensors["data"], "quant_map": tensors["quant_map"], "absmax": absmax}


@pytest.mark.parametrize("path", cpu4.PATHS)
@pytest.mark.parametrize("fmt", DQ_FORMATS)
@pytest.mark.parametrize("shape", STRADDLING, ids=str)
def test_double_quantized_rows_across_nested_blocks_match_the_oracle(path, fmt, shape):
    needs(path)
    qm = matrix(shape, fmt, seed=7)
    w = oracle_weight(qm).double()  # [Out, In]
    x = activations(max(ROWS), shape[1], torch.bfloat16, seed=8)  # [64, In]
    for n in ROWS:
        y, _ = cpu4.run(x[:n], qm.tensors, shape, path)  # [n, Out] fp32
        errors = row_errors(y, x[:n].double() @ w.T)
        assert errors.max().item() <= bound(path, shape), (n, errors.max().item())


@pytest.mark.parametrize("path", cpu4.PATHS)
@pytest.mark.parametrize("fmt", DQ_FORMATS)
@pytest.mark.parametrize("shape", STRADDLING, ids=str)
def test_double_quantized_gives_the_bits_of_its_decoded_absmax(path, fmt, shape):
    needs(path)
    qm = matrix(shape, fmt, seed=7)
    x = activations(max(ROWS), shape[1], torch.float32, seed=9)
    fused = plain(qm.tensors, decoded_absmax(qm.tensors, fused=True))
    separate = plain(qm.tensors, decoded_absmax(qm.tensors, fused=False))
    assert not torch.equal(fused["absmax"], separate["absmax"])  # the two decodings do differ
    for n in ROWS:
        got, _ = cpu4.run(x[:n], qm.tensors, shape, path, threads=2)
        alone, _ = cpu4.run(x[:n], qm.tensors, shape, path, threads=1)
        assert torch.equal(got, alone), n
        want, _ = cpu4.run(x[:n], fused, shape, path)
        if path == "generic" and not torch.equal(got, want):
            want, _ = cpu4.run(x[:n], separate, shape, path)  # no fma contraction there
        assert torch.equal(got, want), (n, (got - want).abs().max().item())


def test_a_wrong_nested_absmax_misses_the_oracle():
    """The bounds are not vacuous here either: one nested block's fp32 absmax 10% off (the one
    that rows 8 and 9 of (37, 14336) use) and every path misses the oracle on those rows."""
    shape = (37, 14336)
    qm = matrix(shape, "nf4-dq", seed=7)
    tensors = dict(qm.tensors)
    tensors["nested_absmax"] = qm.tensors["nested_absmax"].clone()
    tensors["nested_absmax"][7] *= 1.1  # blocks 1792-2047: all of row 8, row 9's first 32
    x = activations(2, shape[1], torch.float32, seed=8)
    want = x.double() @ oracle_weight(qm).double().T  # [2, Out]
    for path in cpu4.runnable_paths():
        y, _ = cpu4.run(x, tensors, shape, path)
        errors = (y.double() - want).norm(dim=0) / want.norm(dim=0)  # per output row of W
        assert min(errors[8].item(), errors[9].item()) > SIMD_BOUND, path
        assert errors[[0, 1, 7, 10, 36]].max().item() <= bound(path, shape), path
