"""Triton selective scan against the float64 reference: output, final state and every gradient (CPU: interpreter)."""

from __future__ import annotations

import importlib

import pytest
import torch

from kernels_support import DEVICE, LOW_PRECISION, check_against_truth, scan_inputs
from mamba_export.ops import selective_scan_ref

mk = pytest.importorskip("mamba_kernels")
scan_module = importlib.import_module("mamba_kernels.selective_scan")  # the module, not the function


def check_scan(x64: dict, dtype: torch.dtype, softplus: bool = True) -> None:
    check_against_truth(selective_scan_ref, mk.selective_scan, x64, dtype, "scan", delta_softplus=softplus)


@pytest.mark.parametrize("chunks", [1, 3])
def test_scan_fp32_every_input_time_major(monkeypatch, chunks):
    """All inputs, the model's strides (time slowest), n not a power of 2, one chunk and several chunks."""
    monkeypatch.setattr(scan_module, "_num_chunks", lambda *a: chunks)
    check_scan(scan_inputs(2, 5, 70, 6, torch.float32, time_major=True), torch.float32)


def test_scan_fp32_no_optional_inputs():
    check_scan(scan_inputs(1, 3, 33, 4, torch.float32, seed=2, optional=False), torch.float32, softplus=False)


def test_scan_fp32_many_channels_exact_tiles(monkeypatch):
    """A part block (d=20 of 32 channels; n=16: the backward's reduce-scatter over the lanes, as gathers under the
    interpreter), l a multiple of the tile, 4 chunks of two tiles."""
    monkeypatch.setattr(scan_module, "_num_chunks", lambda *a: 4)
    check_scan(scan_inputs(1, 20, 128, 16, torch.float32, seed=3), torch.float32)


@pytest.mark.parametrize("chunks", [1, 3])
def test_scan_u_rows_in_vectors_with_a_tail(monkeypatch, chunks):
    """u a slice of a longer buffer: its rows are 16-byte aligned, so the forward loads u 4 steps (fp32) at a time,
    and l = 70 leaves 2 steps after the last whole group (the forward's tail loop); 32 channels, one full block."""
    monkeypatch.setattr(scan_module, "_num_chunks", lambda *a: chunks)
    x = scan_inputs(2, 32, 70, 16, torch.float32, seed=6)
    wide = torch.zeros(2, 32, 72, dtype=torch.float64, device=x["u"].device)
    wide[:, :, :70] = x["u"].detach()
    x["u"] = wide[:, :, :70].detach().requires_grad_()
    assert x["u"].stride() == (32 * 72, 72, 1)
    assert scan_module._u_group(x["u"].float()) == 1  # contiguous fp32 rows of 70: not aligned to 4 steps
    assert scan_module._u_group(torch.empty_strided((2, 32, 70), (32 * 72, 72, 1))) == 4
    check_scan(x, torch.float32)


@pytest.mark.parametrize("chunks", [1, 3])
@pytest.mark.parametrize("time_major", [False, True])
def test_scan_quad_kernels(monkeypatch, chunks, time_major):
    """d_state 16 takes the kernels with 4 lanes a channel (_fwd_quad_kernel, _bwd_local_quad_kernel,
    _bwd_quad_kernel; the other three are removed here, so they cannot have run): a part block (d = 12, 8 channels a
    warp), l = 70 (its last group of 4 steps has 2, its last tile of 16 steps 6), an initial state, one chunk and
    several (the local passes, the carries and the main passes from each chunk's start or end)."""
    monkeypatch.setattr(scan_module, "_num_chunks", lambda *a: chunks)
    monkeypatch.setattr(scan_module, "_fwd_seq_kernel", None)
    monkeypatch.setattr(scan_module, "_bwd_local_kernel", None)
    monkeypatch.setattr(scan_module, "_bwd_seq_kernel", None)
    check_scan(scan_inputs(2, 12, 70, 16, torch.float32, seed=8, time_major=time_major), torch.float32)


def test_scan_quad_forward_no_optional_inputs(monkeypatch):
    """The 4-lane forward without D, z, Δ bias, softplus or an initial state; l = 5 (a whole group and a part)."""
    monkeypatch.setattr(scan_module, "_fwd_seq_kernel", None)
    check_scan(scan_inputs(1, 8, 5, 16, torch.float32, seed=9, optional=False), torch.float32, softplus=False)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_scan_quad_forward_low_precision(monkeypatch, dtype):
    monkeypatch.setattr(scan_module, "_fwd_seq_kernel", None)
    check_scan(scan_inputs(2, 8, 37, 16, dtype, seed=10, time_major=True), dtype)


def test_scan_d_state_16_without_the_quad_kernels(monkeypatch):
    """With the 4-lane kernels switched off (_FWD["quad"], _BWD["quad"] None, _BWD["quad_local"] False), d_state 16
    runs the lane-a-channel forward, local adjoint and backward (3 chunks)."""
    monkeypatch.setattr(scan_module, "_num_chunks", lambda *a: 3)
    monkeypatch.setitem(scan_module._FWD, "quad", None)
    monkeypatch.setitem(scan_module._BWD, "quad", None)
    monkeypatch.setitem(scan_module._BWD, "quad_local", False)
    monkeypatch.setattr(scan_module, "_fwd_quad_kernel", None)
    monkeypatch.setattr(scan_module, "_bwd_local_quad_kernel", None)
    monkeypatch.setattr(scan_module, "_bwd_quad_kernel", None)
    check_scan(scan_inputs(1, 8, 70, 16, torch.float32, seed=11), torch.float32)


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
    assert sub.shape == (1, 0, 4, 8)


def test_scan_without_a_gradient_skips_autograd(monkeypatch):
    """Under no_grad (or with no input needing a gradient) selective_scan calls the forward directly, not through the
    autograd Function (whose apply costs host time), with the same outputs; with a gradient it takes the Function."""
    x = {k: None if v is None else v.detach().float() for k, v in scan_inputs(1, 4, 21, 8, torch.float32).items()}
    y_ref, h_ref = mk.selective_scan(**x, delta_softplus=True)
    applied = []
    real_apply = scan_module._eager_scan
    monkeypatch.setattr(scan_module, "_eager_scan", lambda *a: applied.append(1) or real_apply(*a))
    with torch.no_grad():
        y, h = mk.selective_scan(**{k: None if v is None else v.requires_grad_() for k, v in x.items()},
                                 delta_softplus=True)
    assert not applied and not y.requires_grad
    assert torch.equal(y, y_ref) and torch.equal(h, h_ref)
    y, h = mk.selective_scan(**x, delta_softplus=True)
    assert applied == [1] and y.requires_grad and torch.equal(y.detach(), y_ref)


@pytest.mark.parametrize("which", [0, 1])
def test_scan_gradient_through_one_output(which):
    """A loss on y alone or on the final state alone: the other output's gradient is None in the backward (no zeros
    are made for it), and every input's gradient still matches the float64 reference's."""
    x64 = scan_inputs(1, 4, 37, 8, torch.float64, seed=7)
    x32 = {k: None if v is None else v.detach().float().requires_grad_() for k, v in x64.items()}
    grads = []
    for fn, x in ((selective_scan_ref, x64), (mk.selective_scan, x32)):
        out = fn(**x, delta_softplus=True)[which]
        names = [k for k, v in x.items() if v is not None]
        loss = (out * out.detach()).sum()
        grads.append(dict(zip(names, torch.autograd.grad(loss, [x[k] for k in names], allow_unused=True))))
    for name, truth in grads[0].items():
        got = grads[1][name]
        if truth is None:  # the final state does not depend on C, D or z
            assert got is None or not got.any(), name
        else:
            err = ((got.double() - truth).norm() / truth.norm()).item()
            assert err < 1e-4, (name, err)
    assert sum(t is not None for t in grads[0].values()) == (9 if which == 0 else 6)


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
    x = {k: v.to(DEVICE) for k, v in x.items()}
    with pytest.raises(mk.KernelInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        mk.selective_scan(**x)


def test_scan_rejects_rows_past_32_bit_offsets():
    """A batch row spanning 2**31 elements or more is refused with a clear error (the kernels address a row with
    32-bit integers); on meta tensors, so nothing is allocated."""
    checks = importlib.import_module("mamba_kernels._checks")
    with pytest.raises(mk.KernelInputError, match=r"spans 2147483651 elements"):
        checks.check_row_offsets("u", torch.empty_strided((1, 2, 3), (1, 2**31, 1), device="meta"))
    checks.check_row_offsets("u", torch.empty_strided((1, 2, 3), (1, 2**31 - 3, 1), device="meta"))  # 2**31 - 1


def test_chunk_policy():
    """Unchunked when batch x channel blocks fill the GPU (b8 x 192 blocks on 132 SMs); batch 1 gets ~48 programs per
    SM in the lane-a-channel forward. The backward (one warp of 32 channels a program, ~255 registers) chunks below 4
    programs per SM, to ~32: b8 d1536 is 384 programs, 11 chunks."""
    assert scan_module._num_chunks(8 * 192, 132) == 1
    assert scan_module._num_chunks(192, 132) == 33
    assert scan_module._num_chunks(8 * 48, 132, *scan_module._BWD["chunking"]) == 11
    assert scan_module._num_chunks(1000, 132, *scan_module._BWD["chunking"]) == 1
    assert scan_module._num_chunks(48, 132, scan_module._BWD["chunking"][0], scan_module._BWD["chunking_few"]) == 132
    # the 4-lane forward (d_state 16): a warp of 8 channels a program; b8 d1536 unchunked, b1 d1536 in 44 chunks
    warps, *quad = scan_module._FWD["quad"]
    assert warps == 1
    assert scan_module._num_chunks(8 * 192, 132, *quad) == 1
    assert scan_module._num_chunks(192, 132, *quad) == 44
    # the 4-lane backward (d_state 16, 8 channels a program, 8 programs an SM resident): b8 d1536 in 2 chunks (2.9
    # waves), b1 d1536 (below 4 programs an SM) in 33
    few_below, few_target = scan_module._BWD["quad_few"]
    assert 8 * 192 >= few_below * 132 > 192
    assert scan_module._num_chunks(8 * 192, 132, *scan_module._BWD["quad"]) == 2
    assert scan_module._num_chunks(192, 132, scan_module._BWD["quad"][0], few_target) == 33


def test_scan_empty_sequence_returns_the_initial_state():
    x = {k: None if v is None else v.detach().float() for k, v in scan_inputs(2, 3, 0, 4, torch.float32).items()}
    y, h = mk.selective_scan(**x, delta_softplus=True)
    assert y.shape == (2, 3, 0) and torch.equal(h, x["initial_state"])
