"""Triton causal conv1d (forward, backward, conv state in and out) and its decode step against float64 references."""

from __future__ import annotations

import pytest
import torch

from kernels_support import DEVICE, FP32_FWD_TOL, LOW_PRECISION, check_against_truth, rel_err, strided
from mamba_export.ops import causal_conv1d_ref, causal_conv1d_step_ref

mk = pytest.importorskip("mamba_kernels")


def conv_inputs(b, d, l, k, dtype, bias=True, state=True, time_major=False, seed=0, device=DEVICE) -> dict:
    """float64 leaves holding ``dtype``-rounded x and fp32-rounded weight, bias and conv state."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, l, generator=g, dtype=torch.float64).to(dtype).double()
    out = dict(x=strided(x) if time_major else x, weight=torch.randn(d, k, generator=g, dtype=torch.float64) * 0.5,
               bias=torch.randn(d, generator=g, dtype=torch.float64) if bias else None,
               conv_state=torch.randn(b, d, k - 1, generator=g, dtype=torch.float64) if state else None)
    return {n: None if v is None else (v if n == "x" else v.float().double()).to(device).requires_grad_()
            for n, v in out.items()}


def check_conv(x64: dict, dtype: torch.dtype, silu: bool = True) -> None:
    check_against_truth(causal_conv1d_ref, mk.causal_conv1d, x64, dtype, "conv", silu=silu)


def test_conv_fp32_state_bias_silu_time_major():
    """Two channel blocks, two time blocks, the model's strides: every gradient including the incoming state."""
    check_conv(conv_inputs(2, 20, 70, 4, torch.float32, time_major=True), torch.float32)


@pytest.mark.parametrize("k", [2, 3])
def test_conv_fp32_no_bias_no_state_no_silu(k):
    check_conv(conv_inputs(1, 3, 9, k, torch.float32, bias=False, state=False, seed=k), torch.float32, silu=False)


def test_conv_sequence_shorter_than_state():
    """l < k - 1: the new state still holds part of the old one."""
    check_conv(conv_inputs(2, 3, 2, 4, torch.float32, seed=7), torch.float32)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_conv_low_precision(dtype):
    check_conv(conv_inputs(2, 5, 20, 4, dtype, seed=3), dtype)


@pytest.mark.parametrize("bias", [True, False])
def test_conv_step_matches_reference(bias):
    g = torch.Generator().manual_seed(5)
    b, d, k = 3, 20, 4
    x = torch.randn(2 * d, b, generator=g).t()[:, :d].to(DEVICE)  # strided, as a slice of in_proj's output
    w, bi = torch.randn(d, k, generator=g).to(DEVICE), torch.randn(d, generator=g).to(DEVICE) if bias else None
    state = torch.randn(b, d, k - 1, generator=g).to(DEVICE)
    y, s = mk.causal_conv1d_step(x, w, bi, state, True)
    y64, s64 = causal_conv1d_step_ref(x.double(), w.double(), None if bi is None else bi.double(), state.double())
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    assert rel_err(y, y64) <= FP32_FWD_TOL and rel_err(s, s64) == 0.0


def test_conv_rejects_bad_inputs():
    with pytest.raises(mk.KernelInputError, match=r"conv_state must have shape \(1, 3, 3\)"):
        mk.causal_conv1d(torch.zeros(1, 3, 5, device=DEVICE), torch.zeros(3, 4, device=DEVICE), None,
                         torch.zeros(1, 3, 2, device=DEVICE))
    with pytest.raises(mk.KernelInputError, match="width 2 or more"):
        mk.causal_conv1d(torch.zeros(1, 3, 5, device=DEVICE), torch.zeros(3, 1, device=DEVICE))


def test_conv_backward_writes_dx_in_x_layout():
    """x as the model hands it over (a time-major view of in_proj's output): dx comes back time-major, so autograd
    can concatenate it with dz into (b, l, 2d) without a transpose; the values are those of a contiguous x's."""
    g = torch.Generator().manual_seed(9)
    xz = torch.randn(2, 9, 10, generator=g).to(DEVICE)
    x = xz[:, :, :5].transpose(1, 2)
    w, bias = torch.randn(5, 4, generator=g).to(DEVICE), torch.randn(5, generator=g).to(DEVICE)
    state, dy = torch.zeros(2, 5, 3, device=DEVICE), torch.randn(2, 5, 9, generator=g).to(DEVICE)
    dx = torch.ops.mamba_kernels.causal_conv1d_bwd(dy, x, w, bias, state, True)[0]
    dx_c = torch.ops.mamba_kernels.causal_conv1d_bwd(dy, x.contiguous(), w, bias, state, True)[0]
    assert dx.stride() == (45, 1, 5) and dx_c.stride() == (45, 9, 1)
    assert torch.equal(dx, dx_c)
