"""Inputs and error measures shared by the kernel tests.

Tolerance policy (docs/kernels.md): errors are measured against the reference ops run in float64 on the same
(rounded) inputs, as ||out - truth|| / ||truth|| (2-norms over the whole tensor: one wrong element among a
thousand still shows as ~3e-2). float32 kernels must stay under a fixed bound; float16 and bfloat16 kernels must be
no worse than twice the plain-PyTorch reference run in the same dtype, or within the float32 bound (for the fp32
outputs of a low-precision run, such as the final state, whose error is only the order of fp32 arithmetic).
"""

from __future__ import annotations

import torch

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
                time_major: bool = False) -> dict:
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
    return {k: None if v is None else v.to(dtype if k in low else torch.float32).to(torch.float64).requires_grad_()
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
        t = torch.empty_strided(v.shape, v.stride(), dtype=dtype if k in low else torch.float32)
        out[k] = t.copy_(v.detach()).requires_grad_()
    return out


def run_with_grads(fn, inputs: dict, cotangents: tuple, **kwargs):
    """Outputs of ``fn(**inputs, **kwargs)`` and the gradients of sum(output * cotangent) for every tensor input."""
    outs = fn(**inputs, **kwargs)
    names = [k for k, v in inputs.items() if v is not None]
    loss = sum((o * c.to(o.dtype)).sum() for o, c in zip(outs, cotangents))
    grads = torch.autograd.grad(loss, [inputs[k] for k in names])
    return outs, dict(zip(names, grads))
