"""GPU tests at the channel counts of mamba-130m (1536) and mamba-1.4b (4096), sequences up to 8k, batch 1 and 8.

Outputs and every gradient against the reference ops in float64; each error must stay within twice the error of the
plain-PyTorch reference in the same dtype (or the float32 floor): see kernels_support. Run with ``-s`` to see them.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from kernels_support import FP32_GRAD_TOL, check_against_truth, rel_err, scan_inputs
from mamba_export.config import MambaConfig
from mamba_export.model import MambaLM
from mamba_export.ops import causal_conv1d_ref, selective_scan_ref
from test_kernel_conv import conv_inputs
from test_kernel_norm import kernel as add_rms_norm_kernel
from test_kernel_norm import norm_inputs
from test_kernel_norm import ref as add_rms_norm_ref

mk = pytest.importorskip("mamba_kernels")
pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("b, d, l, dtype", [
    (1, 1536, 8192, torch.bfloat16),  # batch 1, long: the chunked path
    (8, 1536, 2048, torch.bfloat16),
    (1, 4096, 4096, torch.float16),
    (8, 4096, 1000, torch.float32),  # l not a multiple of the tile
    (32, 512, 256, torch.bfloat16),  # the kjv-byte training shape: 2048 programs, an unchunked backward
])
def test_scan_real_shapes(b, d, l, dtype):
    x64 = scan_inputs(b, d, l, 16, dtype, seed=l, time_major=True, device="cuda")
    check_against_truth(selective_scan_ref, mk.selective_scan, x64, dtype, f"scan b{b} d{d} l{l}",
                        delta_softplus=True)


def test_scan_real_shape_lane_a_channel_kernels(monkeypatch):
    """d_state 16 with the 4-lane kernels switched off: the lane-a-channel forward and backward (the path of every
    other d_state) at a real shape, chunked in both."""
    scan_module = importlib.import_module("mamba_kernels.selective_scan")
    monkeypatch.setitem(scan_module._FWD, "quad", None)
    monkeypatch.setitem(scan_module._BWD, "quad", None)
    monkeypatch.setattr(scan_module, "_fwd_quad_kernel", None)
    monkeypatch.setattr(scan_module, "_bwd_quad_kernel", None)
    x64 = scan_inputs(1, 1536, 4096, 16, torch.bfloat16, seed=5, time_major=True, device="cuda")
    check_against_truth(selective_scan_ref, mk.selective_scan, x64, torch.bfloat16, "scan lane-a-channel b1 l4096",
                        delta_softplus=True)


@pytest.mark.parametrize("b, d, l, dtype", [(8, 1536, 2048, torch.bfloat16), (1, 4096, 8192, torch.float32)])
def test_conv_real_shapes(b, d, l, dtype):
    x64 = conv_inputs(b, d, l, 4, dtype, time_major=True, device="cuda")
    check_against_truth(causal_conv1d_ref, mk.causal_conv1d, x64, dtype, f"conv b{b} d{d} l{l}", silu=True)


@pytest.mark.parametrize("rows, d", [((8, 2048), 768), ((1, 4096), 2048), ((2, 1000), 2560)])
def test_add_rms_norm_real_shapes(rows, d):
    """The d_model of mamba-130m, -1.4b and -2.8b: a bf16 block output added to an fp32 stream, then the norm."""
    check_against_truth(add_rms_norm_ref, add_rms_norm_kernel, norm_inputs(rows, d, torch.bfloat16, seed=d),
                        torch.bfloat16, f"add_rms_norm {rows} d{d}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_step_matches_reference_on_gpu(dtype):
    """mamba-130m widths (d_model 768, d_inner 1536), 2 layers, batch 2 x 512 tokens: loss and every gradient."""
    cfg = MambaConfig(d_model=768, n_layer=2, vocab_size=1000)
    torch.manual_seed(0)
    base = MambaLM(cfg).cuda()
    ids = torch.randint(0, cfg.vocab_size, (2, 513), device="cuda")

    def step(model):
        model.zero_grad()
        logits, _ = model(ids[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1))
        loss.backward()
        return loss.item(), {n: p.grad.double() for n, p in model.named_parameters()}

    def copy(backend, dt):
        m = MambaLM(cfg, backend=backend).to("cuda", dt)
        m.load_state_dict(base.state_dict())
        return m

    loss64, g64 = step(copy("reference", torch.float64))
    loss_r, g_r = step(copy("reference", dtype))
    loss_k, g_k = step(copy("triton", dtype))
    print(f"train step {dtype}: loss64 {loss64:.6f} reference {loss_r:.6f} triton {loss_k:.6f}")
    assert abs(loss_k - loss64) <= max(2 * abs(loss_r - loss64), 1e-5 * abs(loss64))
    bad = {}
    for name in g64:
        err, bound = rel_err(g_k[name], g64[name]), max(2 * rel_err(g_r[name], g64[name]), FP32_GRAD_TOL)
        if not err <= bound:
            bad[name] = (err, bound)
    assert not bad, f"gradient errors above bounds (err, bound): {bad}"


def test_scan_64k_batch1_bounded_memory():
    """64k tokens at batch 1 run forward and backward; the extra memory is a fraction of the (b, d, l, n) states."""
    b, d, l, n = 1, 1536, 65536, 16
    g = torch.Generator(device="cuda").manual_seed(0)
    x = [torch.randn(*s, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
         for s in [(b, d, l), (b, d, l), (b, n, l), (b, n, l), (b, d, l)]]
    A = (-torch.rand(d, n, device="cuda", generator=g) - 0.1).requires_grad_()
    # the cotangents exist before the baseline, so that the peak is the scan's (a loss like y.float().sum() would add
    # its own fp32 copy of y, 384 MiB here)
    gy = torch.randn(b, d, l, device="cuda", generator=g, dtype=torch.bfloat16)
    gh = torch.randn(b, d, n, device="cuda", generator=g)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    y, h = mk.selective_scan(x[0], x[1], A, x[2], x[3], None, x[4], None, True, None)
    torch.autograd.backward([y, h], [gy, gh])
    extra = torch.cuda.max_memory_allocated() - base
    full_states = b * d * l * n * 4
    print(f"64k scan: peak extra memory {extra / 2**20:.0f} MiB, full fp32 states would be "
          f"{full_states / 2**20:.0f} MiB")
    assert torch.isfinite(y.float()).all() and all(torch.isfinite(t.grad.float()).all() for t in x)
    assert extra < full_states / 4
