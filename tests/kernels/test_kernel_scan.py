"""Triton selective scan against the float64 reference: output, final state and every gradient (CPU: interpreter)."""

from __future__ import annotations

import importlib

import pytest
import torch

from kernels_support import (FP32_FWD_TOL, FP32_GRAD_TOL, LOW_PRECISION, cast_inputs, rel_err, run_with_grads,
                             scan_inputs)
from mamba_export.ops import selective_scan_ref

mk = pytest.importorskip("mamba_kernels")
scan_module = importlib.import_module("mamba_kernels.selective_scan")  # the module, not the function


def check_scan(x64: dict, dtype: torch.dtype, softplus: bool = True) -> None:
    """Compare the kernel in ``dtype`` with the float64 truth; low precision against 2x the reference's error."""
    g = torch.Generator().manual_seed(1)
    y64, h64 = selective_scan_ref(**x64, delta_softplus=softplus)
    cot = (torch.randn(y64.shape, generator=g, dtype=torch.float64), torch.randn(h64.shape, generator=g,
                                                                                dtype=torch.float64))
    (y_t, h_t), g_t = run_with_grads(selective_scan_ref, x64, cot, delta_softplus=softplus)
    (y_k, h_k), g_k = run_with_grads(mk.selective_scan, cast_inputs(x64, dtype), cot, delta_softplus=softplus)
    assert y_k.dtype == dtype and h_k.dtype == torch.float32 and y_k.shape == y_t.shape
    if dtype in LOW_PRECISION:
        (y_r, h_r), g_r = run_with_grads(selective_scan_ref, cast_inputs(x64, dtype), cot, delta_softplus=softplus)
        bound = {"y": max(2 * rel_err(y_r, y_t), FP32_FWD_TOL), "h": max(2 * rel_err(h_r, h_t), FP32_FWD_TOL)}
        bound.update({k: max(2 * rel_err(g_r[k], g_t[k]), FP32_GRAD_TOL) for k in g_t})
    else:
        bound = {"y": FP32_FWD_TOL, "h": FP32_FWD_TOL, **{k: FP32_GRAD_TOL for k in g_t}}
    errs = {"y": rel_err(y_k, y_t), "h": rel_err(h_k, h_t), **{k: rel_err(g_k[k], g_t[k]) for k in g_t}}
    for k, v in g_k.items():
        assert v.dtype == cast_inputs(x64, dtype)[k].dtype, k
    bad = {k: (errs[k], bound[k]) for k in errs if not errs[k] <= bound[k]}
    assert not bad, f"errors above bounds (err, bound): {bad}"


@pytest.mark.parametrize("chunks", [1, 3])
def test_scan_fp32_every_input_time_major(monkeypatch, chunks):
    """All inputs, the model's strides (time slowest), n not a power of 2, one chunk and several chunks."""
    monkeypatch.setattr(scan_module, "_num_chunks", lambda *a: chunks)
    check_scan(scan_inputs(2, 5, 70, 6, torch.float32, time_major=True), torch.float32)


def test_scan_fp32_no_optional_inputs():
    check_scan(scan_inputs(1, 3, 33, 4, torch.float32, seed=2, optional=False), torch.float32, softplus=False)


def test_scan_fp32_many_channels_exact_tiles(monkeypatch):
    """Several channel blocks (d=20, n=16: 8 channels a block), l a multiple of the tile, 4 chunks of one tile."""
    monkeypatch.setattr(scan_module, "_num_chunks", lambda *a: 4)
    check_scan(scan_inputs(1, 20, 128, 16, torch.float32, seed=3), torch.float32)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_scan_low_precision(dtype):
    check_scan(scan_inputs(2, 4, 40, 8, dtype, seed=4), dtype)


def test_scan_single_step_matches_state_update():
    """l = 1 continues the state exactly as one decode step does."""
    x = scan_inputs(2, 4, 1, 8, torch.float32, seed=5)
    check_scan(x, torch.float32)


def test_scan_without_grad_saves_nothing():
    x = {k: None if v is None else v.detach().float() for k, v in scan_inputs(1, 4, 40, 8, torch.float32).items()}
    _, _, sub = scan_module._scan_fwd_op(**x, delta_softplus=True, save_states=False)
    assert sub.shape == (1, 4, 0, 8)


@pytest.mark.parametrize("bad, message", [
    (dict(u=torch.zeros(2, 5, 9)), "delta must have shape"),
    (dict(A=torch.zeros(5, 6, dtype=torch.float64)), "float64"),
    (dict(B=torch.zeros(2, 6, 7)), "B must have shape (2, 6, 9)"),
])
def test_scan_rejects_bad_inputs(bad, message):
    x = dict(u=torch.zeros(2, 5, 9), delta=torch.zeros(2, 5, 9), A=torch.zeros(5, 6), B=torch.zeros(2, 6, 9),
             C=torch.zeros(2, 6, 9))
    x.update(bad)
    if "u" in bad:
        x["delta"] = torch.zeros(2, 5, 8)
    with pytest.raises(mk.KernelInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        mk.selective_scan(**x)
