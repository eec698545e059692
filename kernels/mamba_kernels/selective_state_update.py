"""One decode token of the selective scan in Triton: state update, output, skip and gate in one kernel.

Contract: :func:`selective_state_update` has the signature, layouts and return values of
:func:`mamba_export.ops.selective_state_update_ref`. Inference only (no autograd); fp32 arithmetic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import KernelInputError, check_runnable, check_tensor, contiguous_or_none
from ._launch import cdiv, fast_launch, next_power_of_2, traced
from ._triton_common import softplus

__all__ = ["selective_state_update"]

_BLOCK_D = 16


@fast_launch
@triton.jit
def _state_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr, new_state_ptr, DIM, N,
    sh_b, sh_d, sh_n, sx_b, sx_d, sdt_b, sdt_d, sB_b, sB_n, sC_b, sC_n, sz_b, sz_d,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """h = exp(Δ A) state + Δ x B -> new_state (contiguous (b, d, n) fp32); y = (C . h + D x) silu(z) -> y (b, d)."""
    pid_d, pid_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < DIM
    mask_dn = mask_d[:, None] & (offs_n < N)[None, :]
    dt = tl.load(dt_ptr + pid_b * sdt_b + offs_d * sdt_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    dt = softplus(dt, SOFTPLUS)
    x = tl.load(x_ptr + pid_b * sx_b + offs_d * sx_d, mask=mask_d, other=0.0).to(tl.float32)
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
    B = tl.load(B_ptr + pid_b * sB_b + offs_n * sB_n, mask=offs_n < N, other=0.0).to(tl.float32)
    C = tl.load(C_ptr + pid_b * sC_b + offs_n * sC_n, mask=offs_n < N, other=0.0).to(tl.float32)
    h = tl.load(state_ptr + pid_b * sh_b + offs_d[:, None] * sh_d + offs_n[None, :] * sh_n, mask=mask_dn, other=0.0)
    h = tl.exp(dt[:, None] * A) * h.to(tl.float32) + (dt * x)[:, None] * B[None, :]
    y = tl.sum(h * C[None, :], axis=1)
    if HAS_D:
        y += x * tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + pid_b * sz_b + offs_d * sz_d, mask=mask_d, other=0.0).to(tl.float32)
        y *= z * tl.sigmoid(z)
    tl.store(y_ptr + pid_b * DIM + offs_d, y.to(y_ptr.dtype.element_ty), mask=mask_d)
    tl.store(new_state_ptr + (pid_b * DIM + offs_d[:, None]) * N + offs_n[None, :], h, mask=mask_dn)


def _state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    """Launch the decode step: y (b, d) in x's dtype and the new state (b, d, n) fp32."""
    b, d = x.shape
    n = A.shape[1]
    A, D, dt_bias = (contiguous_or_none(t) for t in (A, D, dt_bias))
    y = torch.empty(b, d, dtype=x.dtype, device=x.device)
    new_state = torch.empty(b, d, n, dtype=torch.float32, device=x.device)
    zs = (0, 0) if z is None else z.stride()
    _state_update_kernel[(cdiv(d, _BLOCK_D), b)](
        state, x, dt, A, B, C, D, z, dt_bias, y, new_state, d, n,
        *state.stride(), *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *zs,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus,
        BLOCK_D=_BLOCK_D, BLOCK_N=next_power_of_2(n),
    )
    return y, new_state


@torch.library.custom_op("mamba_kernels::selective_state_update", mutates_args=())
def _state_update_op(
    state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None, z: torch.Tensor | None, dt_bias: torch.Tensor | None, dt_softplus: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


@_state_update_op.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    b, d = x.shape
    return x.new_empty(b, d), x.new_empty(b, d, A.shape[1], dtype=torch.float32)


def selective_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the selective scan in one kernel; see :func:`mamba_export.ops.selective_state_update_ref`.

    Args:
        state: (b, d, n); x, dt, z: (b, d); A: (d, n); B, C: (b, n); D, dt_bias: (d,). Any strides.

    Returns:
        y: (b, d) in x's dtype, and the new state (b, d, n) float32.
    """
    if x.dim() != 2 or A.dim() != 2:
        raise KernelInputError(f"selective_state_update needs x (b, d) and A (d, n), got {tuple(x.shape)} and "
                               f"{tuple(A.shape)}")
    b, d = x.shape
    n = A.shape[1]
    check_runnable(x.device)
    for name, t, shape in (("state", state, (b, d, n)), ("x", x, (b, d)), ("dt", dt, (b, d)), ("A", A, (d, n)),
                           ("B", B, (b, n)), ("C", C, (b, n)), ("D", D, (d,)), ("z", z, (b, d)),
                           ("dt_bias", dt_bias, (d,))):
        check_tensor(name, t, shape, x.device)
    op = _state_update_op if traced() else _state_update  # eager: no custom_op dispatch layers
    return op(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
