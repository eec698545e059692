"""The exported graphs as ``nn.Module`` wrappers with the contract's flat inputs and outputs.

Both wrappers take ``forward(input_ids, past_conv.0, past_ssm.0, past_conv.1, ...)`` and return
``(logits, present_conv.0, present_ssm.0, ...)``: input_ids (b, l) int64; past/present_conv.i (b, E, K-1) and
past/present_ssm.i (b, E, N) float32; logits (b, l, V) in the weight dtype ((b, 1, V) for ``last_logits``).
They compute what :class:`~mamba_export.model.MambaLM` computes, with the mixer's sequence operators, the RMSNorms
and the residual adds replaced by the custom-op-domain operators of docs/CONTRACTS.md (an :class:`OpSet`, see
:mod:`.torch_ops`): layer 0 normalises the embedding with ``RMSNorm``; every later layer and the final norm take the
previous block's output and the residual stream through one ``AddRMSNorm`` (the residual add, then the norm).
``DecodeGraph(model, decode_weights="float16")`` keeps float16 copies of in_proj, out_proj and the LM head and
multiplies them with ``LinearF16W`` (float32 activations, weights widened to float32); the rest is unchanged.
``decode_weights="int8"`` keeps int8 copies with a float32 scale per output row (:func:`quantize_rows_int8`) and
multiplies them with ``LinearI8W``.
``DecodeGraph(model, decode_blocks=True)`` runs every layer as one ``DecodeBlock`` (AddRMSNorm, in_proj, DecodeStep
and out_proj in one node, the projection weights in nn.Linear's [out, in] layout); layer 0's block adds the embedding
to a constant zero residual row, which the op broadcasts over the batch; the final norm and the LM head are one
``DecodeHead`` (its weight the head's [V, d] matrix: a tied model's embedding table, the Gather's initializer).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from ..config import MambaConfig
from ..model import MambaLM, MambaMixer
from . import torch_ops


class OpSet(NamedTuple):
    """Implementations of SelectiveScan, CausalConv1d, DecodeStep, RMSNorm, AddRMSNorm, DecodeBlock and DecodeHead
    with the signatures of :mod:`.torch_ops`."""

    selective_scan: Callable
    causal_conv1d: Callable
    decode_step: Callable
    rms_norm: Callable
    add_rms_norm: Callable
    decode_block: Callable
    decode_head: Callable


CUSTOM_OPS = OpSet(torch_ops.selective_scan, torch_ops.causal_conv1d, torch_ops.decode_step, torch_ops.rms_norm,
                   torch_ops.add_rms_norm, torch_ops.decode_block, torch_ops.decode_head)


def io_names(n_layer: int) -> tuple[list[str], list[str]]:
    """Graph input and output names of the contract, in the wrappers' argument order."""
    inputs, outputs = ["input_ids"], ["logits"]
    for i in range(n_layer):
        inputs += [f"past_conv.{i}", f"past_ssm.{i}"]
        outputs += [f"present_conv.{i}", f"present_ssm.{i}"]
    return inputs, outputs


def example_inputs(cfg: MambaConfig, batch: int, seq: int) -> tuple[Tensor, ...]:
    """Zero inputs of the wrappers for tracing: input_ids (batch, seq) and a zero state."""
    past: list[Tensor] = []
    for _ in range(cfg.n_layer):
        past += [torch.zeros(batch, cfg.d_inner, cfg.d_conv - 1), torch.zeros(batch, cfg.d_inner, cfg.d_state)]
    return (torch.zeros(batch, seq, dtype=torch.int64), *past)


DECODE_WEIGHT_DTYPES = ("float32", "float16", "int8")


def decode_blocks_unavailable(cfg: MambaConfig, decode_weights: str = "float32") -> str | None:
    """Why decode.onnx cannot use DecodeBlock for a model of config ``cfg`` (None when it can): the op has no
    in_proj/out_proj bias and takes its matrices in the activation dtype."""
    if cfg.bias:
        return "the model has in_proj/out_proj biases, which DecodeBlock does not take"
    if decode_weights != "float32":
        return (f"not with --decode-weights {decode_weights} (DecodeBlock takes its matrices in the activation "
                "dtype)")
    return None


class F16WeightLinear(nn.Module):
    """An ``nn.Linear`` of a float32 model with its weight stored as float16: ``LinearF16W(x, weight)`` (+ bias).

    weight (N, K) float16, each output's row contiguous; x (..., K) float32 -> (..., N) float32."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.register_buffer("weight", linear.weight.detach().to(torch.float16).contiguous())
        self.bias = linear.bias

    def forward(self, x: Tensor) -> Tensor:
        y = torch_ops.linear_f16w(x, self.weight)
        return y if self.bias is None else y + self.bias


def quantize_rows_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 quantization with one scale per row (output) of an (N, K) weight: scale = max |row| / 127
    rounded to float32 (1 for an all-zero row; at least 2^-126, the smallest normal float32, so that a row of tiny
    weights keeps a scale that is neither subnormal nor zero), q = round(row / scale) in [-127, 127], computed in
    float64 from the float32 scale that is stored, so float32(q) * scale is the nearest such value to each weight
    (error <= scale / 2, up to the float32 rounding of the scale for the row's largest weight).

    Returns:
        (q (N, K) int8, scale (N,) float32).

    Raises:
        ValueError: the weight holds NaN or infinite values (checkpoint import refuses those already)."""
    w = weight.detach().to(torch.float64)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("cannot quantize a weight with NaN or infinite values to int8")
    amax = w.abs().amax(dim=1)
    smallest = torch.finfo(torch.float32).tiny
    scale = torch.where(amax > 0, (amax / 127).clamp(min=smallest), torch.ones_like(amax)).to(torch.float32)
    q = torch.round(w / scale.to(torch.float64)[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale


class I8WeightLinear(nn.Module):
    """An ``nn.Linear`` of a float32 model with its weight stored as int8 and a float32 scale per output row:
    ``LinearI8W(x, weight, scale)`` (+ bias).

    weight (N, K) int8, each output's row contiguous; scale (N,) float32; x (..., K) float32 -> (..., N) float32."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        q, scale = quantize_rows_int8(linear.weight)
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale)
        self.bias = linear.bias

    def forward(self, x: Tensor) -> Tensor:
        y = torch_ops.linear_i8w(x, self.weight, self.scale)
        return y if self.bias is None else y + self.bias


_NARROW_LINEAR = {"float16": F16WeightLinear, "int8": I8WeightLinear}


def neg_exp_f32(a_log: Tensor) -> Tensor:
    """-exp(A_log) as the float32 constant the graphs store, computed by numpy in float64 and rounded once.

    Not torch.exp: on torch 2.13's CPU build (MKL), the first float32 exp of a process, split over two threads, has
    come back from the second thread with errors up to 3.5e-4 (relative) in about one process in ten; an export then
    stored layer 0's A with half its rows off (found by a repeated-export check, twenty-fifth session)."""
    a = a_log.detach().to("cpu", torch.float64).numpy()
    return torch.from_numpy(-np.exp(a)).to(torch.float32).contiguous()


class _Mixer(nn.Module):
    """One mixer's modules plus its parameters in the custom ops' float32 form (A = -exp(A_log), zero conv bias)."""

    def __init__(self, mixer: MambaMixer):
        super().__init__()
        self.in_proj, self.x_proj, self.out_proj = mixer.in_proj, mixer.x_proj, mixer.out_proj
        cfg = mixer.cfg
        self.split = [cfg.dt_rank, cfg.d_state, cfg.d_state]
        f32 = lambda t: t.detach().to(torch.float32).contiguous()  # noqa: E731
        conv_bias = mixer.conv1d.bias if mixer.conv1d.bias is not None else torch.zeros(cfg.d_inner)
        self.dt_proj_weight = mixer.dt_proj.weight  # (E, R) in the weight dtype, for the prefill graph
        self.register_buffer("conv_weight", f32(mixer.conv1d.weight[:, 0, :]))
        self.register_buffer("conv_bias", f32(conv_bias))
        self.register_buffer("A", neg_exp_f32(mixer.A_log))
        self.register_buffer("D", f32(mixer.D))
        self.register_buffer("dt_bias", f32(mixer.dt_proj.bias))

    def sequence(self, ops: OpSet, h: Tensor, conv: Tensor, ssm: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """h (b, l, D) -> (b, l, D), new conv (b, E, K-1), new ssm (b, E, N)."""
        x, z = self.in_proj(h).chunk(2, dim=-1)  # (b, l, E) each
        x, conv = ops.causal_conv1d(x, conv, self.conv_weight, self.conv_bias)
        dt, B, C = torch.split(self.x_proj(x), self.split, dim=-1)
        dt = dt @ self.dt_proj_weight.t()  # (b, l, E), bias and softplus inside the scan
        y, ssm = ops.selective_scan(x, dt, self.A, B, C, self.D, z, self.dt_bias, ssm)
        return self.out_proj(y), conv, ssm

    def _step_parameters(self) -> tuple[Tensor, ...]:
        """DecodeStep's inputs after the states, float32: conv weight and bias, x_proj, dt_proj, dt_bias, A, D."""
        return (self.conv_weight, self.conv_bias, self.x_proj.weight.to(torch.float32),
                self.dt_proj_weight.to(torch.float32), self.dt_bias, self.A, self.D)

    def decode(self, ops: OpSet, h: Tensor, conv: Tensor, ssm: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """h (b, 1, D) -> (b, 1, D), new conv, new ssm; the parameters enter DecodeStep as float32."""
        y, conv, ssm = ops.decode_step(self.in_proj(h), conv, ssm, *self._step_parameters())
        return self.out_proj(y), conv, ssm

    def block(self, ops: OpSet, norm: nn.Module, out: Tensor, residual: Tensor, conv: Tensor,
              ssm: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The previous block's output and the residual (b, 1, D) -> this block's output, the new residual, new conv,
        new ssm: one DecodeBlock (``norm`` is the layer's pre-norm)."""
        return ops.decode_block(
            out, residual, norm.weight, self.in_proj.weight, conv, ssm, *self._step_parameters(),
            self.out_proj.weight, float(norm.eps),
        )


class _Graph(nn.Module):
    def __init__(self, model: MambaLM, ops: OpSet = CUSTOM_OPS):
        super().__init__()
        self.ops = ops
        self.embedding = model.backbone.embedding
        self.norms = nn.ModuleList(layer.norm for layer in model.backbone.layers)
        self.mixers = nn.ModuleList(_Mixer(layer.mixer) for layer in model.backbone.layers)
        self.norm_f, self.lm_head = model.backbone.norm_f, model.lm_head
        self.weight_dtype = model.lm_head.weight.dtype
        self.residual_dtype = model._residual_dtype()
        self.decode_blocks = False  # every layer as one DecodeBlock (decode mode only)

    def _run(self, input_ids: Tensor, past: tuple[Tensor, ...], mode: str, last_logits: bool) -> tuple[Tensor, ...]:
        """MambaLM.forward with each block's residual add fused into the next norm:
        h_0 = RMSNorm(residual_0); h_i, residual_i = AddRMSNorm(out_{i-1}, residual_{i-1}) for i > 0 and norm_f.
        Decode blocks: every layer one DecodeBlock, layer 0's on the embedding and a zero residual row; norm_f and
        the LM head one DecodeHead."""
        ops = self.ops
        blocks = mode == "decode" and self.decode_blocks
        if blocks:  # layer 0 adds the embedding to a zero residual
            out, residual = self.embedding(input_ids), self.zero_residual
        else:
            residual = self.embedding(input_ids).to(self.residual_dtype)
            first = self.norms[0]
            h = ops.rms_norm(residual, first.weight, float(first.eps))
            out = h  # replaced by the first block's output
        present: list[Tensor] = []
        for i, mixer in enumerate(self.mixers):
            conv, ssm = past[2 * i], past[2 * i + 1]
            if blocks:
                out, residual, conv, ssm = mixer.block(ops, self.norms[i], out, residual, conv, ssm)
            else:
                if i > 0:
                    norm = self.norms[i]
                    h, residual = ops.add_rms_norm(out, residual, norm.weight, float(norm.eps))
                out, conv, ssm = getattr(mixer, mode)(ops, h, conv, ssm)
            present += [conv.to(torch.float32), ssm.to(torch.float32)]
        if last_logits:
            out, residual = out[:, -1:], residual[:, -1:]
        if blocks:  # lm_head has no bias (MambaLM), and blocks rule out decode_weights' narrow-weight head
            logits = ops.decode_head(out, residual, self.norm_f.weight, self.lm_head.weight, float(self.norm_f.eps))
        else:
            h, _ = ops.add_rms_norm(out, residual, self.norm_f.weight, float(self.norm_f.eps))
            logits = self.lm_head(h)
        return (logits, *present)


class SequenceGraph(_Graph):
    """model.onnx (and model_last.onnx with ``last_logits``): any number of new tokens, CausalConv1d + SelectiveScan."""

    def __init__(self, model: MambaLM, ops: OpSet = CUSTOM_OPS, last_logits: bool = False):
        super().__init__(model, ops)
        self.last_logits = last_logits

    def forward(self, input_ids: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        """input_ids (b, l), past states -> logits (b, l, V) or (b, 1, V), present states."""
        return self._run(input_ids, past, "sequence", self.last_logits)


class DecodeGraph(_Graph):
    """decode.onnx: exactly one new token per sequence, one fused DecodeStep per layer.

    ``decode_weights="float16"`` (float32 models only): in_proj, out_proj and the LM head are
    :class:`F16WeightLinear` (half the bytes a step reads); ``"int8"``: :class:`I8WeightLinear` (a quarter, plus a
    scale per row); the embedding keeps its float32 table.
    ``decode_blocks`` (models without in_proj/out_proj bias, float32 decode weights): every layer is one DecodeBlock,
    layer 0's with a zero residual row, and norm_f and the LM head are one DecodeHead on the head's [V, d] weight (for
    a tied model the embedding's table: one initializer, no transposed copy)."""

    def __init__(self, model: MambaLM, ops: OpSet = CUSTOM_OPS, decode_weights: str = "float32",
                 decode_blocks: bool = False):
        super().__init__(model, ops)
        if decode_weights not in DECODE_WEIGHT_DTYPES:
            raise ValueError(f"decode_weights must be one of {DECODE_WEIGHT_DTYPES}, not {decode_weights!r}")
        why_not = decode_blocks_unavailable(model.config, decode_weights)
        if decode_blocks and why_not:
            raise ValueError(f"decode blocks are not available: {why_not}")
        self.decode_blocks = decode_blocks
        if decode_blocks:
            # Layer 0's residual input: one zero row for every sequence (DecodeBlock broadcasts a [1, 1, d]
            # residual), so residual_out = R(0 + embedding), exactly what RMSNorm normalises in the other graphs.
            self.register_buffer("zero_residual", torch.zeros(1, 1, model.config.d_model, dtype=self.residual_dtype),
                                 persistent=False)
        if decode_weights != "float32":
            if self.weight_dtype != torch.float32:
                raise ValueError(f"{decode_weights} decode weights need a float32 model")
            narrow = _NARROW_LINEAR[decode_weights]
            for mixer in self.mixers:
                mixer.in_proj, mixer.out_proj = narrow(mixer.in_proj), narrow(mixer.out_proj)
            self.lm_head = narrow(self.lm_head)

    def forward(self, input_ids: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        """input_ids (b, 1), past states -> logits (b, 1, V), present states."""
        return self._run(input_ids, past, "decode", False)
