"""Causal depthwise conv1d (+ SiLU) over time in Triton: forward, backward, and the one-token decode step.

Contracts: :func:`causal_conv1d` and :func:`causal_conv1d_step` have the signatures, layouts and return values of
:func:`mamba_export.ops.causal_conv1d_ref` and :func:`mamba_export.ops.causal_conv1d_step_ref`.

Both views index the input extended by the state, xs = cat(conv_state, x) of length k - 1 + l, so that
out_t = bias + sum_j weight[:, j] xs[t + j]. The backward runs two kernels: the first writes the pre-activation's
gradient dpre_t (fp32) and partial sums of the weight and bias gradients; the second tiles positions s of xs and
writes d xs[s] = sum_j weight[:, j] dpre[s - j], the gradient of x (s >= k - 1) and of the incoming conv state
(s < k - 1). The outgoing conv state (the last k - 1 of xs) is a slice taken in PyTorch, whose autograd adds its
gradient. Arithmetic is fp32 whatever the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import KernelInputError, check_runnable, check_tensor, contiguous_or_none, empty_like_bdl
from ._launch import cdiv, eager_function, fast_launch, next_power_of_2, pick, traced, wants_grad
from ._triton_common import load_channel_vector

__all__ = ["causal_conv1d", "causal_conv1d_step"]

# (channels, positions) a program. H100, the model's time-major bf16 x, CUDA-graph medians of a sweep over (16, 64),
# (32, 64), (64, 32), (64, 64), (128, 16), (128, 32), (32, 128): the forward is fastest at (64, 32) (b8 d1536 l2048
# 0.0803 -> 0.0618 ms, b32 d512 l256 0.0255 -> 0.0235), the backward's two kernels at (32, 64) (fwd + bwd with the
# forward at that size 0.3092 -> 0.2857 and 0.0767 -> 0.0744). The decode step takes _BLOCK_D channels a program.
_FWD_BLOCK = (64, 32)
_BWD_BLOCK = (32, 64)
_BLOCK_D = 16


@triton.jit
def _xs(x_ptr, state_ptr, pid_b, offs_d, mask_d, s, L, KM1, sx_b, sx_d, sx_l, ss_b, ss_d, ss_l):
    """fp32 xs[:, s] for a (BLOCK_D, BLOCK_L) tile of positions s of cat(state, x); 0 outside [0, KM1 + L)."""
    in_x = (s >= KM1) & (s < KM1 + L)
    in_state = (s >= 0) & (s < KM1)
    xv = tl.load(x_ptr + pid_b * sx_b + offs_d[:, None] * sx_d + (s - KM1)[None, :] * sx_l,
                 mask=mask_d[:, None] & in_x[None, :], other=0.0)
    sv = tl.load(state_ptr + pid_b * ss_b + offs_d[:, None] * ss_d + s[None, :] * ss_l,
                 mask=mask_d[:, None] & in_state[None, :], other=0.0)
    return xv.to(tl.float32) + sv.to(tl.float32)


@triton.jit
def _pre(x_ptr, state_ptr, w_ptr, bias, pid_b, offs_d, mask_d, t, L, sx_b, sx_d, sx_l, ss_b, ss_d, ss_l,
         K: tl.constexpr):
    """Convolution output before the activation at a (BLOCK_D, BLOCK_L) tile of output positions t."""
    acc = tl.zeros((offs_d.shape[0], t.shape[0]), tl.float32) + bias[:, None]
    for j in tl.static_range(K):
        w = tl.load(w_ptr + offs_d * K + j, mask=mask_d, other=0.0).to(tl.float32)
        acc += w[:, None] * _xs(x_ptr, state_ptr, pid_b, offs_d, mask_d, t + j, L, K - 1, sx_b, sx_d, sx_l,
                                ss_b, ss_d, ss_l)
    return acc


@fast_launch
@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, state_ptr, y_ptr, L, DIM,
    sx_b, sx_d, sx_l, ss_b, ss_d, ss_l,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """y (contiguous (b, d, l)) = [silu](conv(cat(state, x))) for one (channel block, time block, batch)."""
    pid_d, pid_l, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_d = offs_d < DIM
    bias = load_channel_vector(bias_ptr, offs_d, mask_d, HAS_BIAS)
    y = _pre(x_ptr, state_ptr, w_ptr, bias, pid_b, offs_d, mask_d, t, L, sx_b, sx_d, sx_l, ss_b, ss_d, ss_l, K)
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(y_ptr + pid_b * DIM * L + offs_d[:, None] * L + t[None, :], y.to(y_ptr.dtype.element_ty),
             mask=mask_d[:, None] & (t < L)[None, :])


@fast_launch
@triton.jit
def _conv_dpre_kernel(
    x_ptr, w_ptr, bias_ptr, state_ptr, dy_ptr, dpre_ptr, dw_ptr, dbias_ptr, L, DIM, NBLK,
    sx_b, sx_d, sx_l, ss_b, ss_d, ss_l, sdy_b, sdy_d, sdy_l,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Backward, first pass, for output positions t of this block: the gradient of the pre-activation -> dpre
    (contiguous (b, d, l) fp32), and partial sums over t of dweight -> dw (b, NBLK, d, K) and of dbias -> dbias
    (b, NBLK, d)."""
    pid_d, pid_l, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_d = offs_d < DIM
    mask = mask_d[:, None] & (t < L)[None, :]
    dy = tl.load(dy_ptr + pid_b * sdy_b + offs_d[:, None] * sdy_d + t[None, :] * sdy_l, mask=mask, other=0.0)
    dpre = dy.to(tl.float32)
    if SILU:
        bias = load_channel_vector(bias_ptr, offs_d, mask_d, HAS_BIAS)
        pre = _pre(x_ptr, state_ptr, w_ptr, bias, pid_b, offs_d, mask_d, t, L, sx_b, sx_d, sx_l, ss_b, ss_d, ss_l, K)
        sig = tl.sigmoid(pre)
        dpre = dpre * sig * (1.0 + pre * (1.0 - sig))
    tl.store(dpre_ptr + pid_b * DIM * L + offs_d[:, None] * L + t[None, :], dpre, mask=mask)
    part = (pid_b * NBLK + pid_l) * DIM + offs_d
    for j in tl.static_range(K):
        xs = _xs(x_ptr, state_ptr, pid_b, offs_d, mask_d, t + j, L, K - 1, sx_b, sx_d, sx_l, ss_b, ss_d, ss_l)
        tl.store(dw_ptr + part * K + j, tl.sum(dpre * xs, axis=1), mask=mask_d)
    tl.store(dbias_ptr + part, tl.sum(dpre, axis=1), mask=mask_d)


@fast_launch
@triton.jit
def _conv_dx_kernel(
    dpre_ptr, w_ptr, dx_ptr, dstate_ptr, L, DIM, sdx_b, sdx_d, sdx_l,
    K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Backward, second pass, for positions s of xs in this block: d xs[s] = sum_j weight[:, j] dpre[s - j] -> dx
    ((b, d, l), its strides) or dstate (contiguous (b, d, k-1))."""
    pid_d, pid_s, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    s = pid_s * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_d = offs_d < DIM
    dxs = tl.zeros((BLOCK_D, BLOCK_L), tl.float32)
    for j in tl.static_range(K):
        w = tl.load(w_ptr + offs_d * K + j, mask=mask_d, other=0.0).to(tl.float32)
        t = s - j
        dp = tl.load(dpre_ptr + pid_b * DIM * L + offs_d[:, None] * L + t[None, :],
                     mask=mask_d[:, None] & ((t >= 0) & (t < L))[None, :], other=0.0)
        dxs += w[:, None] * dp
    dx_mask = mask_d[:, None] & ((s >= K - 1) & (s < K - 1 + L))[None, :]
    tl.store(dx_ptr + pid_b * sdx_b + offs_d[:, None] * sdx_d + (s - (K - 1))[None, :] * sdx_l,
             dxs.to(dx_ptr.dtype.element_ty), mask=dx_mask)
    tl.store(dstate_ptr + pid_b * DIM * (K - 1) + offs_d[:, None] * (K - 1) + s[None, :], dxs,
             mask=mask_d[:, None] & (s < K - 1)[None, :])


@fast_launch
@triton.jit
def _conv_step_kernel(
    x_ptr, w_ptr, bias_ptr, state_ptr, y_ptr, new_state_ptr, DIM,
    sx_b, sx_d, ss_b, ss_d, ss_k,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One token: window = [state, x]; y (contiguous (b, d)) = [silu](window . w + bias); new state (contiguous
    (b, d, K-1) fp32) = window[:, 1:]."""
    pid_d, pid_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    k = tl.arange(0, BLOCK_K)
    mask_d = offs_d < DIM
    sv = tl.load(state_ptr + pid_b * ss_b + offs_d[:, None] * ss_d + k[None, :] * ss_k,
                 mask=mask_d[:, None] & (k < K - 1)[None, :], other=0.0).to(tl.float32)
    xv = tl.load(x_ptr + pid_b * sx_b + offs_d * sx_d, mask=mask_d, other=0.0).to(tl.float32)
    window = tl.where((k == K - 1)[None, :], xv[:, None], sv)
    w = tl.load(w_ptr + offs_d[:, None] * K + k[None, :], mask=mask_d[:, None] & (k < K)[None, :], other=0.0)
    y = tl.sum(window * w.to(tl.float32), axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(y_ptr + pid_b * DIM + offs_d, y.to(y_ptr.dtype.element_ty), mask=mask_d)
    tl.store(new_state_ptr + pid_b * DIM * (K - 1) + offs_d[:, None] * (K - 1) + (k - 1)[None, :], window,
             mask=mask_d[:, None] & ((k >= 1) & (k < K))[None, :])


# ----------------------------------------------------------------------------------------------------------------------
# Launchers


def _check_conv_args(x, weight, bias, conv_state, time_dim: bool) -> None:
    want = 3 if time_dim else 2
    if x.dim() != want or weight.dim() != 2:
        raise KernelInputError(f"causal conv needs x with {want} dims and weight (d, k), got {tuple(x.shape)} and "
                               f"{tuple(weight.shape)}")
    b, d = x.shape[:2]
    k = weight.shape[1]
    if k < 2:
        raise KernelInputError(f"the Triton causal conv needs a filter of width 2 or more, got {k}")
    check_runnable(x.device)
    for name, t, shape in (("x", x, tuple(x.shape)), ("weight", weight, (d, k)), ("bias", bias, (d,)),
                           ("conv_state", conv_state, (b, d, k - 1))):
        check_tensor(name, t, shape, x.device)


def _conv_fwd(x, weight, bias, conv_state, silu):
    """y (b, d, l) in x's dtype from x (b, d, l), weight (d, k), bias (d,) or None, conv_state (b, d, k - 1)."""
    b, d, l = x.shape
    k = weight.shape[1]
    weight, bias = weight.contiguous(), contiguous_or_none(bias)
    y = torch.empty(b, d, l, dtype=x.dtype, device=x.device)
    if l:
        block_d, block_l = _FWD_BLOCK
        grid = (cdiv(d, block_d), cdiv(l, block_l), b)
        _conv_fwd_kernel[grid](x, weight, bias, conv_state, y, l, d, *x.stride(), *conv_state.stride(), K=k,
                               HAS_BIAS=bias is not None, SILU=silu, BLOCK_D=block_d, BLOCK_L=block_l)
    return y


def _conv_bwd(dy, x, weight, bias, conv_state, silu):
    """dx (b, d, l) in x's dtype, dweight (d, k), dbias (d,) fp32 (empty without bias), dstate (b, d, k - 1) fp32.
    Two passes: the pre-activation's gradient (into an fp32 buffer) with the weight and bias gradients, then the
    input's (each position's from k of those)."""
    b, d, l = x.shape
    k = weight.shape[1]
    weight, bias = weight.contiguous(), contiguous_or_none(bias)
    f32 = dict(dtype=torch.float32, device=x.device)
    block_d, block_l = _BWD_BLOCK
    nblk = cdiv(l, block_l)
    dx, dstate = empty_like_bdl(x), torch.empty(b, d, k - 1, **f32)
    dw, dbias = torch.empty(b, nblk, d, k, **f32), torch.empty(b, nblk, d, **f32)
    dpre = torch.empty(b, d, l, **f32)
    grid_d = cdiv(d, block_d)
    if l:
        _conv_dpre_kernel[(grid_d, nblk, b)](
            x, weight, bias, conv_state, dy, dpre, dw, dbias, l, d, nblk,
            *x.stride(), *conv_state.stride(), *dy.stride(),
            K=k, HAS_BIAS=bias is not None, SILU=silu, BLOCK_D=block_d, BLOCK_L=block_l,
        )
    _conv_dx_kernel[(grid_d, cdiv(l + k - 1, block_l), b)](
        dpre, weight, dx, dstate, l, d, *dx.stride(), K=k, BLOCK_D=block_d, BLOCK_L=block_l,
    )
    return dx, dw.sum((0, 1)), dbias.sum((0, 1)) if bias is not None else dbias.new_empty(0), dstate


@torch.library.custom_op("mamba_kernels::causal_conv1d_fwd", mutates_args=())
def _conv_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv_state: torch.Tensor,
                 silu: bool) -> torch.Tensor:
    return _conv_fwd(x, weight, bias, conv_state, silu)


@_conv_fwd_op.register_fake
def _(x, weight, bias, conv_state, silu):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("mamba_kernels::causal_conv1d_bwd", mutates_args=())
def _conv_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 conv_state: torch.Tensor, silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _conv_bwd(dy, x, weight, bias, conv_state, silu)


@_conv_bwd_op.register_fake
def _(dy, x, weight, bias, conv_state, silu):
    b, d, l = x.shape
    k = weight.shape[1]
    f32 = dict(dtype=torch.float32)
    return (empty_like_bdl(x), x.new_empty(d, k, **f32),
            x.new_empty(d if bias is not None else 0, **f32), x.new_empty(b, d, k - 1, **f32))


def _conv_setup_context(ctx, inputs, output):
    x, weight, bias, conv_state, silu = inputs
    ctx.silu = silu
    ctx.save_for_backward(x, weight, bias, conv_state)


def _conv_backward(ctx, dy, bwd=None):
    """The gradients of the forward op's inputs, from bwd (the backward op; _eager_conv: _conv_bwd itself)."""
    x, weight, bias, conv_state = ctx.saved_tensors
    dx, dw, dbias, dstate = (bwd or _conv_bwd_op)(dy, x, weight, bias, conv_state, ctx.silu)
    return (dx, dw.to(weight.dtype), dbias.to(bias.dtype) if bias is not None else None,
            dstate.to(conv_state.dtype), None)


torch.library.register_autograd("mamba_kernels::causal_conv1d_fwd", _conv_backward, setup_context=_conv_setup_context)
# eager mode: the launchers themselves, without custom_op's dispatch layers (see _launch.traced)
_eager_conv = eager_function(_conv_fwd, _conv_setup_context, lambda ctx, dy: _conv_backward(ctx, dy, bwd=_conv_bwd))


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    conv_state: torch.Tensor | None = None,
    silu: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton causal depthwise conv, differentiable in x, weight, bias and conv_state; see
    :func:`mamba_export.ops.causal_conv1d_ref`.

    Args:
        x: (b, d, l); weight: (d, k); bias: (d,) or None; conv_state: (b, d, k - 1) or None (zeros).

    Returns:
        y: (b, d, l) in x's dtype, and the new conv state (b, d, k - 1) float32: the last k - 1 inputs.
    """
    _check_conv_args(x, weight, bias, conv_state, time_dim=True)
    b, d, l = x.shape
    k = weight.shape[1]
    if conv_state is None:
        conv_state = torch.zeros(b, d, k - 1, dtype=torch.float32, device=x.device)
    op = pick(_conv_fwd_op, _eager_conv, _conv_fwd, wants_grad(x, weight, bias, conv_state))
    y = op(x, weight, bias, conv_state, silu)
    xs_tail = torch.cat([conv_state.to(torch.float32), x[:, :, max(0, l - (k - 1)):].to(torch.float32)], dim=-1)
    return y, xs_tail[:, :, xs_tail.shape[-1] - (k - 1):]


def _conv_step(x, weight, bias, conv_state, silu):
    """Launch the decode step: y (b, d) in x's dtype and the new state (b, d, k - 1) fp32."""
    b, d = x.shape
    k = weight.shape[1]
    weight, bias = weight.contiguous(), contiguous_or_none(bias)
    y = torch.empty(b, d, dtype=x.dtype, device=x.device)
    new_state = torch.empty(b, d, k - 1, dtype=torch.float32, device=x.device)
    _conv_step_kernel[(cdiv(d, _BLOCK_D), b)](
        x, weight, bias, conv_state, y, new_state, d, *x.stride(), *conv_state.stride(),
        K=k, HAS_BIAS=bias is not None, SILU=silu, BLOCK_D=_BLOCK_D, BLOCK_K=next_power_of_2(k),
    )
    return y, new_state


@torch.library.custom_op("mamba_kernels::causal_conv1d_step", mutates_args=())
def _conv_step_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv_state: torch.Tensor,
                  silu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _conv_step(x, weight, bias, conv_state, silu)


@_conv_step_op.register_fake
def _(x, weight, bias, conv_state, silu):
    b, d = x.shape
    return x.new_empty(b, d), x.new_empty(b, d, weight.shape[1] - 1, dtype=torch.float32)


def causal_conv1d_step(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_state: torch.Tensor,
    silu: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode token in one kernel (state shift, conv, bias, SiLU); see
    :func:`mamba_export.ops.causal_conv1d_step_ref`. Inference only (no autograd).

    Args:
        x: (b, d); weight: (d, k); bias: (d,) or None; conv_state: (b, d, k - 1).

    Returns:
        y: (b, d) in x's dtype, and the new conv state (b, d, k - 1) float32.
    """
    _check_conv_args(x, weight, bias, conv_state, time_dim=False)
    return (_conv_step_op if traced() else _conv_step)(x, weight, bias, conv_state, silu)
