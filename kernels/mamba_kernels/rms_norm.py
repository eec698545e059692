"""The pre-norm block's residual add and RMSNorm as one Triton kernel, forward and backward.

Contract: :func:`add_rms_norm` has the signature and return values of
:func:`mamba_export.ops.add_rms_norm_ref`: residual_out = residual + x (in the residual's dtype; x alone where there
is no residual yet), y = residual_out / sqrt(mean(residual_out^2) + eps) * weight in float32, in the weight's dtype.

In training the reference spends about 20 elementwise kernels and reductions a block on this, forward and backward
(the add, the casts, pow, mean, rsqrt, two products, their gradients and the residual stream's gradient add). Here a
row is one program's tile: the forward reads x and the residual once and writes y, residual_out and 1/rms; the
backward reads dy, residual_out's gradient and residual_out once, writes the gradient of residual_out (for x and the
residual) and a partial sum of the weight's gradient per program, summed by a second small kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import KernelInputError, check_runnable, check_tensor
from ._launch import cdiv, eager_function, fast_launch, next_power_of_2, pick, sm_count, wants_grad

_MAX_BLOCK_D = 16384  # one row a tile: wider models take the reference backend


@fast_launch
@triton.jit
def _add_rms_fwd_kernel(
    x_ptr, r_ptr, w_ptr, y_ptr, ro_ptr, rstd_ptr, N, D, sx, sr, eps,
    HAS_RES: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr,
):
    """ROWS rows: ro = r + x (rounded to ro's dtype), y = ro * rsqrt(mean(ro^2) + eps) * w, rstd = that rsqrt."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    m = (rows < N)[:, None] & (cols < D)[None, :]
    rows = rows.to(tl.int64)
    rdt = ro_ptr.dtype.element_ty
    r = tl.load(x_ptr + rows[:, None] * sx + cols[None, :], mask=m, other=0.0).to(rdt)
    if HAS_RES:
        res = tl.load(r_ptr + rows[:, None] * sr + cols[None, :], mask=m, other=0.0)
        r = (res.to(tl.float32) + r.to(tl.float32)).to(rdt)
    tl.store(ro_ptr + rows[:, None] * D + cols[None, :], r, mask=m)
    rf = r.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(rf * rf, axis=1) / D + eps)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    y = rf * rstd[:, None] * w[None, :]
    tl.store(y_ptr + rows[:, None] * D + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=m)
    tl.store(rstd_ptr + rows, rstd, mask=rows < N)


@fast_launch
@triton.jit
def _add_rms_bwd_kernel(
    dy_ptr, dro_ptr, ro_ptr, w_ptr, rstd_ptr, dx_ptr, dr_ptr, dw_ptr, N, D, sdy, sdro, ROWS_PER_PROG,
    HAS_DRO: tl.constexpr, HAS_DR: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr,
):
    """Rows [pid * ROWS_PER_PROG, +ROWS_PER_PROG), ROWS at a time: with xhat = ro * rstd and g = dy * w,
    d ro = rstd (g - xhat mean(g xhat)) + dro -> dx (x's dtype) and, with HAS_DR, dr (the residual's dtype);
    the sum of dy * xhat over the rows -> dw[pid]."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mc = cols < D
    w = tl.load(w_ptr + cols, mask=mc, other=0.0).to(tl.float32)
    dw = tl.zeros((ROWS, BLOCK_D), tl.float32)
    r0 = pid * ROWS_PER_PROG
    for start in range(r0, tl.minimum(r0 + ROWS_PER_PROG, N), ROWS):
        rows = start + tl.arange(0, ROWS)
        mr = rows < N
        m = mr[:, None] & mc[None, :]
        rows = rows.to(tl.int64)
        rstd = tl.load(rstd_ptr + rows, mask=mr, other=0.0)
        xhat = tl.load(ro_ptr + rows[:, None] * D + cols[None, :], mask=m, other=0.0).to(tl.float32) * rstd[:, None]
        dy = tl.load(dy_ptr + rows[:, None] * sdy + cols[None, :], mask=m, other=0.0).to(tl.float32)
        g = dy * w[None, :]
        c = tl.sum(g * xhat, axis=1) / D
        dr = (g - xhat * c[:, None]) * rstd[:, None]
        if HAS_DRO:
            dr += tl.load(dro_ptr + rows[:, None] * sdro + cols[None, :], mask=m, other=0.0).to(tl.float32)
        tl.store(dx_ptr + rows[:, None] * D + cols[None, :], dr.to(dx_ptr.dtype.element_ty), mask=m)
        if HAS_DR:
            tl.store(dr_ptr + rows[:, None] * D + cols[None, :], dr.to(dr_ptr.dtype.element_ty), mask=m)
        dw += dy * xhat
    tl.store(dw_ptr + pid * D + cols, tl.sum(dw, axis=0), mask=mc)


@fast_launch
@triton.jit
def _sum_rows_kernel(p_ptr, out_ptr, P, D, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[c] = sum over the P rows of p (P, D) fp32, in row order: the weight gradient from the programs' partial
    sums, deterministically (torch's sum over the first axis of so small a tensor took ~12 us on an H100;
    this kernel with 4 programs of 64 columns 8 us)."""
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_P, BLOCK_D), tl.float32)
    for r0 in range(0, P, BLOCK_P):
        rows = r0 + tl.arange(0, BLOCK_P)
        acc += tl.load(p_ptr + rows[:, None] * D + cols[None, :], mask=(rows < P)[:, None] & (cols < D)[None, :],
                       other=0.0)
    tl.store(out_ptr + cols, tl.sum(acc, axis=0), mask=cols < D)


def _tiles(d: int) -> tuple[int, int, int]:
    """BLOCK_D, rows a tile and warps for rows of d elements."""
    block_d = next_power_of_2(d)
    return block_d, max(1, min(16, 2048 // block_d)), 4 if block_d <= 2048 else 8


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as (rows, d) with unit column stride (a view where it can be)."""
    t = t if t.stride(-1) == 1 else t.contiguous()
    return t.reshape(-1, t.shape[-1])


def _norm_fwd(x, residual, weight, eps, residual_dtype):
    """Launch the forward: y in the weight's dtype, residual_out in residual_dtype, 1/rms a row (fp32)."""
    d = x.shape[-1]
    x2 = _rows(x)
    r2 = _rows(residual) if residual is not None else x2
    n = x2.shape[0]
    y = torch.empty(x.shape, dtype=weight.dtype, device=x.device)
    ro = torch.empty(x.shape, dtype=residual_dtype, device=x.device)
    rstd = torch.empty(n, dtype=torch.float32, device=x.device)
    block_d, rows, warps = _tiles(d)
    if n:
        _add_rms_fwd_kernel[(cdiv(n, rows),)](
            x2, r2, weight.contiguous(), y, ro, rstd, n, d, x2.stride(0), r2.stride(0), eps,
            HAS_RES=residual is not None, BLOCK_D=block_d, ROWS=rows, num_warps=warps,
        )
    return y, ro, rstd


@torch.library.custom_op("mamba_kernels::add_rms_norm_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
            residual_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _norm_fwd(x, residual, weight, eps, residual_dtype)


@_fwd_op.register_fake
def _(x, residual, weight, eps, residual_dtype):
    n = x.numel() // max(1, x.shape[-1])
    return (x.new_empty(x.shape, dtype=weight.dtype), x.new_empty(x.shape, dtype=residual_dtype),
            x.new_empty(n, dtype=torch.float32))


def _programs(n: int, device: torch.device) -> int:
    """Backward programs: 2 an SM on a GPU (each sums its rows' weight gradient), fewer for few rows."""
    sms = sm_count(device) if device.type == "cuda" else 32
    return max(1, min(n, 2 * sms))


def _norm_bwd(dy, dro, ro, weight, rstd, x_dtype, has_residual):
    """Launch the backward: the gradients of x (x_dtype) and of the residual (empty without one), and the weight's
    (fp32, summed deterministically)."""
    d = ro.shape[-1]
    dy2 = _rows(dy)
    dro2 = _rows(dro) if dro is not None else dy2
    n = dy2.shape[0]
    dx = torch.empty(ro.shape, dtype=x_dtype, device=ro.device)
    dr = torch.empty(ro.shape if has_residual else (0,), dtype=ro.dtype, device=ro.device)
    block_d, rows, warps = _tiles(d)
    progs = _programs(cdiv(n, rows), ro.device) if n else 1
    per_prog = cdiv(cdiv(n, progs), rows) * rows
    progs = cdiv(n, per_prog) if n else 1
    partial = (torch.empty if n else torch.zeros)(progs, d, dtype=torch.float32, device=ro.device)
    if n:
        _add_rms_bwd_kernel[(progs,)](
            dy2, dro2, ro.contiguous(), weight.contiguous(), rstd, dx, dr, partial, n, d, dy2.stride(0),
            dro2.stride(0), per_prog, HAS_DRO=dro is not None, HAS_DR=has_residual, BLOCK_D=block_d, ROWS=rows,
            num_warps=warps,
        )
    dw = torch.empty(d, dtype=torch.float32, device=ro.device)
    _sum_rows_kernel[(cdiv(d, 16),)](partial, dw, progs, d, BLOCK_P=64, BLOCK_D=16)
    return dx, dr, dw


@torch.library.custom_op("mamba_kernels::add_rms_norm_bwd", mutates_args=())
def _bwd_op(dy: torch.Tensor, dro: torch.Tensor | None, ro: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
            x_dtype: torch.dtype, has_residual: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _norm_bwd(dy, dro, ro, weight, rstd, x_dtype, has_residual)


@_bwd_op.register_fake
def _(dy, dro, ro, weight, rstd, x_dtype, has_residual):
    d = ro.shape[-1]
    return (ro.new_empty(ro.shape, dtype=x_dtype), ro.new_empty(ro.shape if has_residual else (0,)),
            ro.new_empty(d, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    x, residual, weight, eps, residual_dtype = inputs
    _, ro, rstd = output
    ctx.x_dtype, ctx.has_residual = x.dtype, residual is not None
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(ro, weight, rstd)


def _backward(ctx, dy, dro, _drstd, bwd=None):
    """The gradients of the forward op's inputs, from bwd (the backward op; _eager_norm: _norm_bwd itself)."""
    ro, weight, rstd = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(ro, dtype=weight.dtype)
    dx, dr, dw = (bwd or _bwd_op)(dy, dro, ro, weight, rstd, ctx.x_dtype, ctx.has_residual)
    return dx, (dr if ctx.has_residual else None), dw.to(weight.dtype), None, None


torch.library.register_autograd("mamba_kernels::add_rms_norm_fwd", _backward, setup_context=_setup_context)
# eager mode: the launchers themselves, without custom_op's dispatch layers (see _launch.traced)
_eager_norm = eager_function(_norm_fwd, _setup_context, lambda ctx, *grads: _backward(ctx, *grads, bwd=_norm_bwd),
                             non_differentiable=(2,))


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, residual_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton residual add + RMSNorm, differentiable in x, residual and weight; see
    :func:`mamba_export.ops.add_rms_norm_ref`.

    Args:
        x: (..., d) a block's output (or the embeddings); residual: (..., d) or None (x starts the stream);
        weight: (d,); eps: the norm's epsilon; residual_dtype: the stream's dtype where ``residual`` is None.

    Returns:
        y (..., d) in the weight's dtype, and residual_out (..., d) in the residual's dtype.
    """
    d = x.shape[-1] if x.dim() else 0
    check_runnable(x.device)
    check_tensor("x", x, tuple(x.shape), x.device)
    check_tensor("residual", residual, tuple(x.shape), x.device)
    check_tensor("weight", weight, (d,), x.device)
    rdt = residual.dtype if residual is not None else residual_dtype
    if rdt not in (torch.float32, torch.float16, torch.bfloat16):
        raise KernelInputError(f"the Triton RMSNorm keeps the residual in float32, float16 or bfloat16, not {rdt}")
    if x.dim() == 0 or d == 0 or next_power_of_2(d) > _MAX_BLOCK_D:
        raise KernelInputError(f"the Triton RMSNorm takes rows of 1 to {_MAX_BLOCK_D} elements, got shape "
                               f"{tuple(x.shape)} (use the reference backend)")
    op = pick(_fwd_op, _eager_norm, _norm_fwd, wants_grad(x, residual, weight))
    y, ro, _ = op(x, residual, weight, float(eps), rdt)
    return y, ro
