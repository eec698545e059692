"""Inputs and error measures shared by the kernel tests.

Tolerance policy (docs/kernels.md): errors are measured against the reference ops run in float64 on the same
(rounded) inputs, as ||out - truth|| / ||truth|| (2-norms over the whole tensor: one wrong element among a
thousand still shows as ~3e-2). float32 kernels must stay under a fixed bound; float16 and bfloat16 kernels must be
no worse than twice the plain-PyTorch reference run in the same dtype, or within the float32 bound (for the fp32
outputs of a low-precision run, such as the final state, whose error is only the order of fp32 arithmetic). On the
GPU every dtype also gets the "2x the reference" allowance, since Triton's exp is an approximate ex2.
"""

from __future__ import annotations

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the Triton interpreter (conftest)
LOW_PRECISION = (torch.float16, torch.bfloat16)
FP32_FWD_TOL = 1e-5  # relative 2-norm error
FP32_GRAD_TOL = 5e-5


def rel_err(out: torch.Tensor, truth: torch.Tensor) -> float:
    """||out - truth|| / ||truth||, in float64."""
    truth = truth.detach()
    return ((out.detach().double() - truth).norm() / truth.norm().clamp_min(1e-30)).item()


def strided(t: torch.Tensor) -> torch.Tensor:
    """The same values with time as the slow dimension, as the model hands them over ((b, l, d) transposed)."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def scan_inputs(b: int, d: int, l: int, n: int, dtype: torch.dtype, seed: int = 0, optional: bool = True,
                time_major: bool = False, device: str = DEVICE) -> dict:
    """Selective scan inputs as in a trained Mamba layer, already rounded to ``dtype`` (u, delta, B, C, z) or fp32
    (A, D, delta_bias, initial_state), returned in float64 so the truth sees exactly the kernel's inputs."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift

    seq = (lambda t: strided(t)) if time_major else (lambda t: t)
    x = dict(
        u=seq(randn(b, d, l)), delta=seq(randn(b, d, l, scale=0.5, shift=-0.5)),
        A=-torch.exp(randn(d, n, scale=0.5, shift=0.0)), B=seq(randn(b, n, l)), C=seq(randn(b, n, l)),
        D=randn(d) if optional else None, z=seq(randn(b, d, l)) if optional else None,
        delta_bias=randn(d, scale=0.5, shift=-1.0) if optional else None,
        initial_state=randn(b, d, n) if optional else None,
    )
    low = {"u", "delta", "B", "C", "z"}
    return {k: None if v is None else v.to(device, dtype if k in low else torch.float32).double().requires_grad_()
            for k, v in x.items()}


def cast_inputs(x: dict, dtype: torch.dtype) -> dict:
    """Leaf copies of float64 inputs for a run in ``dtype`` (A, D, delta_bias, initial_state stay float32), strides
    kept."""
    low = {"u", "delta", "B", "C", "z", "x", "dt"}
    out = {}
    for k, v in x.items():
        if v is None:
            out[k] = None
            continue
        t = torch.empty_strided(v.shape, v.stride(), dtype=dtype if k in low else torch.float32, device=v.device)
        out[k] = t.copy_(v.detach()).requires_grad_()
    return out


def run_with_grads(fn, inputs: dict, cotangents: tuple, **kwargs):
    """Outputs of ``fn(**inputs, **kwargs)`` and the gradients of sum(output * cotangent) for every tensor input."""
    outs = fn(**inputs, **kwargs)
    names = [k for k, v in inputs.items() if v is not None]
    loss = sum((o * c.to(o.dtype)).sum() for o, c in zip(outs, cotangents))
    grads = torch.autograd.grad(loss, [inputs[k] for k in names])
    return outs, dict(zip(names, grads))


def check_against_truth(ref_fn, kernel_fn, x64: dict, dtype: torch.dtype, label: str = "", **kwargs) -> dict:
    """Run ``kernel_fn`` in ``dtype`` and ``ref_fn`` in float64 and in ``dtype`` on the same inputs, with random
    cotangents on both outputs; assert every output and gradient is within the policy's bound. Returns the errors."""
    g = torch.Generator().manual_seed(1)
    outs64 = ref_fn(**x64, **kwargs)
    cot = tuple(torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device) for o in outs64)
    o_t, g_t = run_with_grads(ref_fn, x64, cot, **kwargs)
    o_k, g_k = run_with_grads(kernel_fn, cast_inputs(x64, dtype), cot, **kwargs)
    o_r, g_r = run_with_grads(ref_fn, cast_inputs(x64, dtype), cot, **kwargs)
    assert [o.dtype for o in o_k] == [o.dtype for o in o_r] and [o.shape for o in o_k] == [o.shape for o in o_r]
    assert all(g_k[n].dtype == g_r[n].dtype for n in g_r)
    low = dtype in LOW_PRECISION or o_k[0].is_cuda
    errs, bounds = {}, {}
    for i, (k, r, t) in enumerate(zip(o_k, o_r, o_t)):
        errs[f"out{i}"] = rel_err(k, t)
        bounds[f"out{i}"] = max(2 * rel_err(r, t), FP32_FWD_TOL) if low else FP32_FWD_TOL
    for n in g_t:
        errs[n] = rel_err(g_k[n], g_t[n])
        bounds[n] = max(2 * rel_err(g_r[n], g_t[n]), FP32_GRAD_TOL) if low else FP32_GRAD_TOL
    print(f"{label} {dtype}: " + ", ".join(f"{n} {errs[n]:.1e} (<= {bounds[n]:.1e})" for n in errs))
    bad = {n: (errs[n], bounds[n]) for n in errs if not errs[n] <= bounds[n]}
    assert not bad, f"errors above bounds (err, bound): {bad}"
    return errs
