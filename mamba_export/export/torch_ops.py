"""The custom-op-domain operators in the layouts of docs/CONTRACTS.md, on top of the reference ops.

``*_cl`` functions: the operators with channels-last activations and float32 parameters and states, implemented by
transposing to the reference layout and calling :mod:`mamba_export.ops`, so an exported graph computes exactly what
the reference model computes. They are TorchScript-compatible (the TorchScript export scripts them).
``rms_norm_cl`` and ``add_rms_norm_cl``: the pre-norm RMSNorm of :class:`mamba_export.model.RMSNorm` (and the residual
add before it), computed as the reference model computes them.
``linear_f16w_ref``: a linear layer whose weight is stored as float16: float32 activations times the weight widened
to float32 (decode.onnx with float16 decode weights).
``linear_i8w_ref``: a linear layer whose weight is stored as int8 with a float32 scale per output row (decode.onnx with
int8 decode weights).
``decode_block_cl``: one whole decode layer (AddRMSNorm, in_proj, DecodeStep, out_proj), the matrix products summed in
float32 and rounded to the activation dtype.
``decode_head_cl``: the tail of a decode step, the final AddRMSNorm and the LM head, the product likewise.
``selective_scan``, ``causal_conv1d``, ``decode_step``, ``rms_norm``, ``add_rms_norm``, ``linear_f16w``,
``linear_i8w``, ``decode_block``, ``decode_head``: the same as
``torch.library`` custom ops with fake implementations, so that ``torch.export`` sees one node each (translated to one
ONNX node by :mod:`.onnx_ops`).

Symbols: b batch, l new tokens, e d_inner, n d_state, k d_conv, r dt_rank, d d_model.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops import (
    causal_conv1d_ref,
    causal_conv1d_step_ref,
    compute_dtype,
    rms_norm_ref,
    selective_scan_ref,
    selective_state_update_ref,
)

NAMESPACE = "mamba_export"


def selective_scan_cl(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor, delta_bias: Tensor,
    ssm_state: Tensor,
) -> tuple[Tensor, Tensor]:
    """SelectiveScan with softplus: u, delta, z (b, l, e); A (e, n); B, C (b, l, n); D, delta_bias (e,);
    ssm_state (b, e, n) -> y (b, l, e) in u's dtype, new ssm_state (b, e, n) in the compute dtype."""
    y, h = selective_scan_ref(
        u.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), D, z.transpose(1, 2),
        delta_bias, True, ssm_state,
    )
    return y.transpose(1, 2).contiguous(), h.contiguous()


def causal_conv1d_cl(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """CausalConv1d with SiLU: x (b, l, e), conv_state (b, e, k-1), weight (e, k), bias (e,)
    -> y (b, l, e) in x's dtype, new conv_state (b, e, k-1) in the compute dtype."""
    y, state = causal_conv1d_ref(x.transpose(1, 2), weight, bias, conv_state, True)
    return y.transpose(1, 2).contiguous(), state.contiguous()


def decode_step_cl(
    xz: Tensor, conv_state: Tensor, ssm_state: Tensor, conv_weight: Tensor, conv_bias: Tensor,
    x_proj_weight: Tensor, dt_proj_weight: Tensor, dt_bias: Tensor, A: Tensor, D: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """DecodeStep: one token of a mixer between in_proj and out_proj, in the compute dtype.

    xz (b, 1, 2e); conv_state (b, e, k-1); ssm_state (b, e, n); conv_weight (e, k); conv_bias, dt_bias, D (e,);
    x_proj_weight (r + 2n, e); dt_proj_weight (e, r); A (e, n)
    -> y (b, 1, e) in xz's dtype, new conv_state, new ssm_state.
    """
    cd = compute_dtype(xz.dtype)
    x, z = xz[:, 0].to(cd).chunk(2, dim=-1)  # (b, e) each
    x, conv_state = causal_conv1d_step_ref(x, conv_weight, conv_bias, conv_state, True)
    n = A.shape[1]
    dt, B, C = torch.split(x @ x_proj_weight.to(cd).t(), [dt_proj_weight.shape[1], n, n], dim=-1)
    y, h = selective_state_update_ref(ssm_state, x, dt @ dt_proj_weight.to(cd).t(), A, B, C, D, z, dt_bias, True)
    return y.unsqueeze(1).to(xz.dtype), conv_state.contiguous(), h


def rms_norm_cl(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last axis: x (b, l, d) in the residual dtype, weight (d,) -> y (b, l, d) in the weight's dtype.

    y = x / sqrt(mean(x^2) + eps) * weight in the compute dtype (float32; float64 for float64 weights):
    :func:`mamba_export.ops.rms_norm_ref`, which :class:`mamba_export.model.RMSNorm` runs."""
    return rms_norm_ref(x, weight, eps)


def add_rms_norm_cl(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """The residual add of a pre-norm block, then the next RMSNorm: x (b, l, d) (a block's output, weight dtype),
    residual (b, l, d) (the residual stream's dtype), weight (d,) -> y (b, l, d) in the weight's dtype, and the new
    residual (b, l, d) in the residual's dtype.

    residual_out = residual + x (added in the residual's dtype, as :class:`mamba_export.model.MambaLM` does);
    y = rms_norm(residual_out) of the rounded sum."""
    residual_out = residual + x.to(residual.dtype)
    return rms_norm_cl(residual_out, weight, eps), residual_out


def linear_f16w_ref(x: Tensor, weight: Tensor) -> Tensor:
    """LinearF16W: x (..., K) float32, weight (N, K) float16 -> x @ float32(weight).T (..., N) float32 (no bias)."""
    return x @ weight.to(torch.float32).t()


def linear_i8w_ref(x: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
    """LinearI8W: x (..., K) float32, weight (N, K) int8, scale (N,) float32 -> (x @ float32(weight).T) * scale
    (..., N) float32 (no bias): each output is its row's sum over the int8 values, times the row's scale."""
    return (x @ weight.to(torch.float32).t()) * scale


def linear_cl(x: Tensor, weight: Tensor) -> Tensor:
    """x (..., K), weight (N, K) in nn.Linear's layout -> x @ weight.T (..., N) in the weight's dtype, summed in the
    compute dtype (float32 for float16 weights) and rounded once."""
    cd = compute_dtype(weight.dtype)
    return (x.to(cd) @ weight.to(cd).t()).to(weight.dtype)


def decode_block_cl(
    x: Tensor, residual: Tensor, norm_weight: Tensor, in_proj_weight: Tensor, conv_state: Tensor, ssm_state: Tensor,
    conv_weight: Tensor, conv_bias: Tensor, x_proj_weight: Tensor, dt_proj_weight: Tensor, dt_bias: Tensor, A: Tensor,
    D: Tensor, out_proj_weight: Tensor, eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """DecodeBlock: one decode layer, AddRMSNorm -> in_proj -> DecodeStep -> out_proj.

    x (b, 1, d) (block i-1's output, or layer 0's embedding) and norm_weight (d,) in T; residual (b, 1, d) in R, or
    (1, 1, d) added to every sequence (layer 0's zero residual); in_proj_weight (2e, d) and
    out_proj_weight (d, e) in T (nn.Linear layout); the DecodeStep inputs as in :func:`decode_step_cl`
    -> out (b, 1, d) in T, residual_out (b, 1, d) in R, new conv_state, new ssm_state.
    """
    h, residual_out = add_rms_norm_cl(x, residual, norm_weight, eps)
    y, conv_state, ssm_state = decode_step_cl(
        linear_cl(h, in_proj_weight), conv_state, ssm_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight,
        dt_bias, A, D,
    )
    return linear_cl(y, out_proj_weight), residual_out, conv_state, ssm_state


def decode_head_cl(x: Tensor, residual: Tensor, norm_weight: Tensor, weight: Tensor, eps: float) -> Tensor:
    """DecodeHead: the tail of a decode step, AddRMSNorm (norm_f) -> LM head.

    x (b, 1, d) (the last block's output) and norm_weight (d,) in T; residual (b, 1, d) in R; weight (V, d) in T
    (nn.Linear layout; a tied model's embedding table) -> logits (b, 1, V) in T, summed in float32 and rounded once.
    The norm's residual_out is not returned: nothing reads it after the last layer.
    """
    return linear_cl(add_rms_norm_cl(x, residual, norm_weight, eps)[0], weight)


selective_scan = torch.library.custom_op(f"{NAMESPACE}::selective_scan", selective_scan_cl, mutates_args=())
causal_conv1d = torch.library.custom_op(f"{NAMESPACE}::causal_conv1d", causal_conv1d_cl, mutates_args=())
decode_step = torch.library.custom_op(f"{NAMESPACE}::decode_step", decode_step_cl, mutates_args=())
rms_norm = torch.library.custom_op(f"{NAMESPACE}::rms_norm", rms_norm_cl, mutates_args=())
add_rms_norm = torch.library.custom_op(f"{NAMESPACE}::add_rms_norm", add_rms_norm_cl, mutates_args=())
linear_f16w = torch.library.custom_op(f"{NAMESPACE}::linear_f16w", linear_f16w_ref, mutates_args=())
linear_i8w = torch.library.custom_op(f"{NAMESPACE}::linear_i8w", linear_i8w_ref, mutates_args=())
decode_block = torch.library.custom_op(f"{NAMESPACE}::decode_block", decode_block_cl, mutates_args=())
decode_head = torch.library.custom_op(f"{NAMESPACE}::decode_head", decode_head_cl, mutates_args=())


@selective_scan.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, ssm_state):
    return torch.empty_like(u), ssm_state.new_empty(ssm_state.shape, dtype=compute_dtype(u.dtype))


@causal_conv1d.register_fake
def _(x, conv_state, weight, bias):
    return torch.empty_like(x), conv_state.new_empty(conv_state.shape, dtype=compute_dtype(x.dtype))


@decode_step.register_fake
def _(xz, conv_state, ssm_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_bias, A, D):
    cd = compute_dtype(xz.dtype)
    y = xz.new_empty((xz.shape[0], 1, xz.shape[2] // 2))
    return y, conv_state.new_empty(conv_state.shape, dtype=cd), ssm_state.new_empty(ssm_state.shape, dtype=cd)


@rms_norm.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape, dtype=weight.dtype)


@add_rms_norm.register_fake
def _(x, residual, weight, eps):
    return residual.new_empty(residual.shape, dtype=weight.dtype), torch.empty_like(residual)


@linear_f16w.register_fake
def _(x, weight):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@linear_i8w.register_fake
def _(x, weight, scale):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@decode_block.register_fake
def _(x, residual, norm_weight, in_proj_weight, conv_state, ssm_state, conv_weight, conv_bias, x_proj_weight,
      dt_proj_weight, dt_bias, A, D, out_proj_weight, eps):
    cd = compute_dtype(x.dtype)
    out = x.new_empty((x.shape[0], 1, out_proj_weight.shape[0]), dtype=out_proj_weight.dtype)
    return (out, residual.new_empty(x.shape), conv_state.new_empty(conv_state.shape, dtype=cd),
            ssm_state.new_empty(ssm_state.shape, dtype=cd))


@decode_head.register_fake
def _(x, residual, norm_weight, weight, eps):
    return x.new_empty((x.shape[0], 1, weight.shape[0]), dtype=weight.dtype)
