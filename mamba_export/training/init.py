"""Mamba's initialisation for training from scratch (state-spaces/mamba ``Mamba.__init__`` and
``mixer_seq_simple._init_weights``)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..model import MambaLM


@torch.no_grad()
def init_dt_proj(dt_proj: nn.Linear, dt_min: float = 1e-3, dt_max: float = 1e-1, dt_init_floor: float = 1e-4) -> None:
    """Δ projection: weight ~ U(±R^-0.5); bias = softplus^-1(dt) with dt log-uniform in [dt_min, dt_max], so that
    softplus(bias) starts as dt. dt_proj: Linear(R -> E)."""
    std = dt_proj.in_features ** -0.5
    nn.init.uniform_(dt_proj.weight, -std, std)
    e = dt_proj.out_features
    dt = torch.exp(torch.rand(e) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_init_floor)
    dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus


@torch.no_grad()
def init_mamba_weights(model: MambaLM) -> None:
    """Re-initialise ``model`` in place as state-spaces/mamba does (draws from torch's global RNG; seed it first).

    Embedding ~ N(0, 0.02); linear biases 0; dt_proj as :func:`init_dt_proj`; A_log = log(1..N) per channel; D = 1;
    out_proj weight with PyTorch's default (Kaiming-uniform) init divided by sqrt(n_layer), so that the residual
    stream's variance does not grow with depth. Other weights keep PyTorch's defaults.
    """
    cfg = model.config
    nn.init.normal_(model.backbone.embedding.weight, std=0.02)
    for layer in model.backbone.layers:
        mixer = layer.mixer
        for lin in (mixer.in_proj, mixer.out_proj):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        init_dt_proj(mixer.dt_proj)
        n = torch.arange(1, cfg.d_state + 1, dtype=mixer.A_log.dtype)
        mixer.A_log.copy_(torch.log(n).repeat(cfg.d_inner, 1))
        mixer.D.fill_(1.0)
        nn.init.kaiming_uniform_(mixer.out_proj.weight, a=math.sqrt(5))
        mixer.out_proj.weight.div_(math.sqrt(cfg.n_layer))
