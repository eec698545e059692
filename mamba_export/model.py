"""The reference Mamba-1 language model in plain PyTorch, with an explicit recurrent state.

Numerically this follows the released state-spaces/mamba checkpoints (``mamba_ssm.models.mixer_seq_simple``
without fused kernels): pre-norm RMSNorm blocks with the residual stream kept in float32, and a mixer of

    in_proj -> (x, z);  x -> causal depthwise conv + SiLU -> x_proj -> (Δ, B, C);  Δ -> dt_proj (+ bias, softplus)
    y = selective_scan(x, Δ, A = -exp(A_log), B, C, D) * SiLU(z);  out_proj(y)

Symbols (see also :mod:`mamba_export.ops`): b batch, l sequence length, D d_model, E d_inner = expand * D,
N d_state, K d_conv, R dt_rank, V vocab_size, L n_layer.

State. The whole recurrent state of the model is a :class:`MambaState` of two tensors:
    conv: (L, b, E, K - 1) the last K - 1 inputs of every layer's convolution, oldest first;
    ssm:  (L, b, E, N)     every layer's SSM state h.
Both are float32 (float64 for a float64 model). Zeros mean the start of a sequence. Feeding a state back continues
the sequence exactly: ``forward(ids[:, :t])`` then ``forward(ids[:, t:], state)`` equals ``forward(ids)``.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import torch.nn as nn

from .backends import Backend, resolve_backend
from .config import MambaConfig
from .ops import compute_dtype, rms_norm_ref


class MambaState(NamedTuple):
    """Recurrent state of all layers: conv (L, b, E, K - 1) and ssm (L, b, E, N), float32 (float64 models: float64)."""

    conv: torch.Tensor
    ssm: torch.Tensor


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32, returned in the weight's dtype."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., D) -> (..., D)."""
        return rms_norm_ref(x, self.weight, self.eps)


class MambaMixer(nn.Module):
    """The selective SSM mixer of one block (parameter names as in state-spaces/mamba's ``Mamba``)."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        E, N, R, K = cfg.d_inner, cfg.d_state, cfg.dt_rank, cfg.d_conv
        self.cfg = cfg
        self.in_proj = nn.Linear(cfg.d_model, 2 * E, bias=cfg.bias)
        self.conv1d = nn.Conv1d(E, E, K, groups=E, padding=K - 1, bias=cfg.conv_bias)
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, E, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(E, 1))
        self.D = nn.Parameter(torch.ones(E))
        self.out_proj = nn.Linear(E, cfg.d_model, bias=cfg.bias)

    def _A(self) -> torch.Tensor:
        return -torch.exp(self.A_log.to(compute_dtype(self.A_log.dtype)))

    def _split_xproj(self, x_dbl: torch.Tensor):
        R, N = self.cfg.dt_rank, self.cfg.d_state
        return torch.split(x_dbl, [R, N, N], dim=-1)

    def _f32(self, p: torch.Tensor | None) -> torch.Tensor | None:
        return None if p is None else p.to(compute_dtype(p.dtype))

    def forward(self, h: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor, backend: Backend):
        """h: (b, l, D); conv_state: (b, E, K-1); ssm_state: (b, E, N) -> (b, l, D), new conv_state, new ssm_state."""
        xz = self.in_proj(h)  # (b, l, 2E)
        # (b, E, l) views, split before the transpose: their gradients are concatenated straight into (b, l, 2E)
        x, z = (t.transpose(1, 2) for t in xz.chunk(2, dim=-1))
        x, conv_state = backend.causal_conv1d(x, self.conv1d.weight[:, 0, :], self.conv1d.bias, conv_state, True)
        # x_proj as a batched W @ x on the conv's (b, E, l) output (x_proj has no bias): torch.matmul(W, x) and
        # F.linear(x^T) would copy x into (b, l, E) first; bmm reads the expanded weight with a batch stride of 0
        w = self.x_proj.weight
        x_dbl = torch.bmm(w.expand(x.shape[0], *w.shape), x).transpose(1, 2)  # (b, l, R + 2N) view
        dt, B, C = self._split_xproj(x_dbl)  # (b, l, R), (b, l, N), (b, l, N)
        dt = (dt @ self.dt_proj.weight.t()).transpose(1, 2)  # (b, E, l), bias added inside the scan
        y, ssm_state = backend.selective_scan(
            x, dt, self._A(), B.transpose(1, 2), C.transpose(1, 2), self._f32(self.D), z,
            self._f32(self.dt_proj.bias), True, ssm_state,
        )
        return self.out_proj(y.transpose(1, 2)), conv_state, ssm_state

    def step(self, h: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor, backend: Backend):
        """Recurrent form for one token. h: (b, D) -> (b, D), new conv_state (b, E, K-1), new ssm_state (b, E, N)."""
        x, z = self.in_proj(h).chunk(2, dim=-1)  # (b, E) each
        x, conv_state = backend.causal_conv1d_step(x, self.conv1d.weight[:, 0, :], self.conv1d.bias, conv_state, True)
        dt, B, C = self._split_xproj(self.x_proj(x))
        dt = dt @ self.dt_proj.weight.t()  # (b, E)
        y, ssm_state = backend.selective_state_update(
            ssm_state, x, dt, self._A(), B, C, self._f32(self.D), z, self._f32(self.dt_proj.bias), True
        )
        return self.out_proj(y), conv_state, ssm_state


class MambaBlock(nn.Module):
    """Pre-norm residual block: residual += mixer(norm(residual))."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = MambaMixer(cfg)


class MambaBackbone(nn.Module):
    """Embedding, the stack of blocks and the final norm (state-spaces/mamba's ``MixerModel``)."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(MambaBlock(cfg) for _ in range(cfg.n_layer))
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps)


class MambaLM(nn.Module):
    """Mamba-1 language model: ``forward(input_ids, state) -> (logits, state)`` and a single-token ``step``.

    Args:
        cfg: the model configuration.
        backend: "reference" (plain PyTorch, the default), "triton" (fused kernels, CUDA or TRITON_INTERPRET), or
            "auto" (Triton for CUDA parameters, reference otherwise). ``self.backend.name`` says which one runs.
    """

    def __init__(self, cfg: MambaConfig, backend: str = "reference"):
        super().__init__()
        self.config = cfg
        self.backbone = MambaBackbone(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight
        self.backend_name = backend
        self.backend = resolve_backend(backend, "cpu")

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self.backend = resolve_backend(self.backend_name, self.lm_head.weight.device.type)
        return out

    def set_backend(self, name: str) -> None:
        """Choose the operator backend ("reference", "triton" or "auto") for this model's current device."""
        self.backend_name = name
        self.backend = resolve_backend(name, self.lm_head.weight.device.type)

    @property
    def state_dtype(self) -> torch.dtype:
        """dtype of both state tensors: float64 for a float64 model, else float32."""
        return compute_dtype(self.lm_head.weight.dtype)

    def empty_state(self, batch: int, device: torch.device | str | None = None) -> MambaState:
        """Zero state (the start of a sequence) for ``batch`` sequences."""
        c = self.config
        device = device if device is not None else self.lm_head.weight.device
        kw = dict(dtype=self.state_dtype, device=device)
        return MambaState(
            torch.zeros(c.n_layer, batch, c.d_inner, c.d_conv - 1, **kw),
            torch.zeros(c.n_layer, batch, c.d_inner, c.d_state, **kw),
        )

    def _residual_dtype(self) -> torch.dtype:
        w = self.lm_head.weight.dtype
        return compute_dtype(w) if self.config.residual_in_fp32 else w

    def _blocks(self, input_ids: torch.Tensor, state: MambaState, mode: str) -> tuple[torch.Tensor, MambaState]:
        """The embedding, every block in ``mode`` ("forward" or "step") and the head. A block's residual add and the
        next norm are one backend call (``add_rms_norm``; fused in the Triton backend); the stream starts as the
        embeddings in the residual dtype."""
        wdt, rdt = self.lm_head.weight.dtype, self._residual_dtype()
        h, residual = self.backbone.embedding(input_ids), None
        convs, ssms = [], []
        for i, layer in enumerate(self.backbone.layers):
            x, residual = self.backend.add_rms_norm(h, residual, layer.norm.weight, layer.norm.eps, rdt)
            h, cs, ss = getattr(layer.mixer, mode)(x.to(wdt), state.conv[i], state.ssm[i], self.backend)
            convs.append(cs.to(self.state_dtype))
            ssms.append(ss.to(self.state_dtype))
        norm_f = self.backbone.norm_f
        x, _ = self.backend.add_rms_norm(h, residual, norm_f.weight, norm_f.eps, rdt)
        return self.lm_head(x), MambaState(torch.stack(convs), torch.stack(ssms))

    def forward(self, input_ids: torch.Tensor, state: MambaState | None = None) -> tuple[torch.Tensor, MambaState]:
        """Run a sequence, continuing from ``state``.

        Args:
            input_ids: (b, l) int64 token ids.
            state: a :class:`MambaState` for b sequences, or None for the start of a sequence.

        Returns:
            logits (b, l, V) in the model's dtype, and the state after the last token.
        """
        if state is None:
            state = self.empty_state(input_ids.shape[0], input_ids.device)
        return self._blocks(input_ids, state, "forward")

    def step(self, input_ids: torch.Tensor, state: MambaState) -> tuple[torch.Tensor, MambaState]:
        """One token per sequence in recurrent form: input_ids (b,) -> logits (b, V), new state."""
        return self._blocks(input_ids, state, "step")

    @torch.no_grad()
    def generate_greedy(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy continuation: prefill with ``forward``, then ``step`` per token. Returns (b, max_new_tokens)."""
        real = self.config.real_vocab_size  # never a padding row
        logits, state = self(input_ids)
        tok = logits[:, -1, :real].argmax(-1)
        out = [tok]
        for _ in range(max_new_tokens - 1):
            logits, state = self.step(tok, state)
            tok = logits[:, :real].argmax(-1)
            out.append(tok)
        return torch.stack(out, dim=1)

    def without_vocab_padding(self) -> "MambaLM":
        """This model for token ids [0, real_vocab_size) only: the embedding and the LM head cut to that many rows
        (copies), every other parameter shared. ``self`` when the vocabulary is not padded."""
        c = self.config
        if c.real_vocab_size == c.vocab_size:
            return self
        cfg = dataclasses.replace(c, vocab_size=c.real_vocab_size)
        with torch.device("meta"):
            out = MambaLM(cfg, backend=self.backend_name)
        sd = self.state_dict()
        for key in ("backbone.embedding.weight", "lm_head.weight"):
            sd[key] = sd[key][: c.real_vocab_size].clone()
        out.load_state_dict(sd, assign=True, strict=True)
        if cfg.tie_embeddings:
            out.lm_head.weight = out.backbone.embedding.weight
        out.set_backend(self.backend_name)
        return out.train(self.training)
