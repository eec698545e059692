"""The launchers' host-side helpers (`mamba_kernels._launch`): integer helpers, the eager autograd path, and the fast
launch of compiled kernels (GPU), which must pick the compilation Triton would and give bit-identical results."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from kernels_support import DEVICE, scan_inputs
from test_kernel_conv import conv_inputs
from test_kernel_norm import kernel as add_rms_norm_kernel
from test_kernel_norm import norm_inputs

mk = pytest.importorskip("mamba_kernels")
launch = importlib.import_module("mamba_kernels._launch")
MODULES = [importlib.import_module(f"mamba_kernels.{m}")
           for m in ("selective_scan", "causal_conv1d", "rms_norm", "selective_state_update")]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def fast_kernels() -> list:
    return [v for m in MODULES for v in vars(m).values() if isinstance(v, launch.FastKernel)]


def test_integer_helpers():
    for a in range(0, 70):
        for b in (1, 3, 8, 16):
            assert launch.cdiv(a, b) == math.ceil(a / b)
    assert [launch.next_power_of_2(n) for n in (0, 1, 2, 3, 4, 5, 16, 17, 1000)] == [1, 1, 2, 4, 4, 8, 16, 32, 1024]


def test_every_launched_kernel_is_wrapped():
    """All 17 kernels the launchers start go through FastKernel (a kernel left out would still work, only slower)."""
    names = sorted(k.fn.__name__ if hasattr(k.fn, "__name__") else k.fn.fn.__name__ for k in fast_kernels())
    assert len(names) == 17 and all(n.endswith("_kernel") for n in names)


def test_interpreter_takes_tritons_path():
    if torch.cuda.is_available():
        pytest.skip("the interpreter runs where there is no CUDA")
    assert not any(k._fast for k in fast_kernels())


def workload(dtype: torch.dtype, offset: int) -> list[torch.Tensor]:
    """A scan, a conv and a norm, forward and backward, and the two decode steps; ``offset`` elements into a larger
    buffer for u and x (an address that is not 16-byte aligned when odd). Returns every output and gradient."""
    outs = []
    low = {"u", "delta", "B", "C", "z"}
    x = {k: None if v is None else v.detach().to(dtype if k in low else torch.float32)
         for k, v in scan_inputs(2, 64, 100, 16, torch.float64, seed=1, device=DEVICE).items()}
    u = torch.empty(x["u"].numel() + offset, dtype=dtype, device=DEVICE)[offset:].view_as(x["u"]).copy_(x["u"])
    x["u"] = u
    leaves = {k: v.requires_grad_() for k, v in x.items() if v is not None and k != "u"}
    y, h = mk.selective_scan(**x, delta_softplus=True)
    grads = dict(zip(leaves, torch.autograd.grad((y.float() ** 2).sum() + h.sum(), list(leaves.values()))))
    atomic = [grads.pop("B"), grads.pop("C")]  # summed over channels with atomics: not bit-reproducible run to run
    outs += [y, h, *grads.values()]
    c = {k: None if v is None else v.detach().float().requires_grad_()
         for k, v in conv_inputs(2, 64, 50, 4, torch.float32, device=DEVICE).items()}
    y, state = mk.causal_conv1d(**c, silu=True)
    outs += [y, state, *torch.autograd.grad((y ** 2).sum(), [v for v in c.values() if v is not None])]
    n = {k: None if v is None else v.detach().float().requires_grad_()
         for k, v in norm_inputs((3, 7), 96, torch.float32).items()}
    y, ro = add_rms_norm_kernel(**n)
    outs += [y, ro, *torch.autograd.grad((y ** 2).sum() + ro.sum(), list(n.values()))]
    with torch.no_grad():
        b, d = 2, 64
        state = torch.zeros(b, d, 3, device=DEVICE)
        outs += list(mk.causal_conv1d_step(x["u"][:, :, 0], c["weight"], c["bias"], state))
        outs += list(mk.selective_state_update(torch.zeros(b, d, 16, device=DEVICE), x["u"][:, :, 0],
                                               x["delta"][:, :, 0], x["A"], x["B"][:, :, 0], x["C"][:, :, 0],
                                               x["D"], x["z"][:, :, 0], x["delta_bias"], dt_softplus=True))
    return [o.detach().clone() for o in outs], [o.detach().clone() for o in atomic]


@needs_cuda
def test_fast_launch_picks_tritons_compilation_and_matches(monkeypatch):
    """Each call of the workload (twice, so that the second round takes the cached path), in fp32 and bf16, with u at
    an aligned and a misaligned address: the compiled kernel the fast path launched is the one Triton's own path
    selects for those arguments (``run(..., warmup=True)``), and every output and gradient is bit-identical to a
    run with the fast path off (the scan's B and C gradients, summed with atomics, to rounding)."""
    assert all(k._fast for k in fast_kernels())
    calls = []
    real = launch.FastKernel._launch

    def recording(self, grid, args, kwargs):
        kernel = real(self, grid, args, kwargs)
        calls.append((self.fn, grid, args, kwargs, kernel))
        return kernel

    monkeypatch.setattr(launch.FastKernel, "_launch", recording)
    fast = []
    for dtype in (torch.float32, torch.bfloat16):
        for offset in (0, 1):
            fast.append([workload(dtype, offset) for _ in range(2)])
    assert len(calls) > 40
    for fn, grid, args, kwargs, kernel in calls:
        assert fn.run(*args, grid=grid, warmup=True, **kwargs) is kernel, fn
    # misaligned u compiled the forward scan anew
    fwd = MODULES[0]._fwd_quad_kernel.fn
    quad = [k for fn, *_, k in calls if fn is fwd]
    assert len({id(k) for k in quad}) >= 2
    for k in fast_kernels():
        monkeypatch.setattr(k, "_fast", False)
    i = 0
    for dtype in (torch.float32, torch.bfloat16):
        for offset in (0, 1):
            slow, slow_atomic = workload(dtype, offset)
            for rnd, rnd_atomic in fast[i]:
                assert len(rnd) == len(slow) == 23
                for a, b in zip(rnd, slow):
                    assert torch.equal(a, b)
                for a, b in zip(rnd_atomic, slow_atomic):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
            i += 1
