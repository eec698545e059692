"""Triton residual add + RMSNorm (forward and backward) against float64 and same-dtype references."""

from __future__ import annotations

import pytest
import torch

from kernels_support import DEVICE, LOW_PRECISION, check_against_truth, rel_err
from mamba_export.ops import add_rms_norm_ref

mk = pytest.importorskip("mamba_kernels")
EPS = 1e-5


def _stream_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def ref(x, residual, weight):
    return add_rms_norm_ref(x, residual, weight, EPS, _stream_dtype(weight))


def kernel(x, residual, weight):
    return mk.add_rms_norm(x, residual, weight, EPS, _stream_dtype(weight))


def norm_inputs(rows: tuple, d: int, dtype: torch.dtype, residual: bool = True, seed: int = 0) -> dict:
    """float64 leaves: x rounded to ``dtype``, residual and weight rounded to fp32 (the model's residual stream)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*rows, d, generator=g, dtype=torch.float64).to(dtype).double()
    r = (torch.randn(*rows, d, generator=g, dtype=torch.float64) * 3).float().double() if residual else None
    w = (1 + 0.3 * torch.randn(d, generator=g, dtype=torch.float64)).float().double()
    return {n: None if v is None else v.to(DEVICE).requires_grad_() for n, v in dict(x=x, residual=r, weight=w).items()}


def test_fp32_with_residual_odd_width():
    """d = 96 (a 128-wide tile, masked), 74 rows (a partial last tile): y, residual_out and all three gradients."""
    check_against_truth(ref, kernel, norm_inputs((2, 37), 96, torch.float32), torch.float32, "add_rms_norm")


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_block_output(dtype):
    """x in bf16 / fp16 (a block's output under autocast), the stream in fp32: dx comes back in x's dtype."""
    check_against_truth(ref, kernel, norm_inputs((3, 20), 64, dtype, seed=2), dtype, "add_rms_norm")


def test_stream_start_without_residual():
    """The first block: residual_out is x itself, in the stream's dtype."""
    check_against_truth(ref, kernel, norm_inputs((2, 9), 40, torch.float32, residual=False, seed=3), torch.float32,
                        "add_rms_norm")


def test_many_programs_weight_gradient_and_unused_residual_out():
    """1280 rows: the backward splits them over several programs, each summing its rows' weight gradient; only y is
    used (the final norm), so residual_out's gradient is absent."""
    x64 = norm_inputs((1280,), 96, torch.float32, seed=4)
    cot = torch.randn(1280, 96, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(DEVICE)
    grads = {}
    for name, fn, cast in (("truth", ref, lambda t: t), ("kernel", kernel, lambda t: t.detach().float()
                                                           .requires_grad_())):
        ins = {k: cast(v) for k, v in x64.items()}
        y, _ = fn(**ins)
        grads[name] = torch.autograd.grad((y * cot.to(y.dtype)).sum(), list(ins.values()))
    for k, t in zip(grads["kernel"], grads["truth"]):
        assert rel_err(k, t) <= 5e-5


def test_stream_in_bf16_matches_the_same_dtype_reference():
    """residual_in_fp32 off with bf16 weights: the sum rounds to bf16 (as in the reference) before the norm."""
    g = torch.Generator().manual_seed(6)
    x, r = (torch.randn(5, 64, generator=g).to(DEVICE, torch.bfloat16) for _ in range(2))
    w = torch.randn(64, generator=g).to(DEVICE, torch.bfloat16)
    y_k, ro_k = mk.add_rms_norm(x, r, w, EPS, torch.bfloat16)
    y_r, ro_r = add_rms_norm_ref(x, r, w, EPS, torch.bfloat16)
    assert ro_k.dtype == y_k.dtype == torch.bfloat16
    assert torch.equal(ro_k, ro_r)
    assert rel_err(y_k, y_r.double()) <= 4e-3  # one bf16 rounding of y


def test_rejects_bad_inputs():
    x = torch.zeros(2, 8, device=DEVICE)
    with pytest.raises(mk.KernelInputError, match=r"weight must have shape \(8,\)"):
        mk.add_rms_norm(x, None, torch.ones(7, device=DEVICE), EPS, torch.float32)
    with pytest.raises(mk.KernelInputError, match=r"residual must have shape \(2, 8\)"):
        mk.add_rms_norm(x, torch.zeros(2, 9, device=DEVICE), torch.ones(8, device=DEVICE), EPS, torch.float32)
    with pytest.raises(mk.KernelInputError, match="float64"):
        mk.add_rms_norm(x.double(), None, torch.ones(8, device=DEVICE, dtype=torch.float64), EPS, torch.float64)
