"""Named training presets: the model shape and the optimisation hyper-parameters of one training run.

"tiny" is for tests and CI (a few steps in seconds on a CPU). "kjv-byte" is the recipe of the model the project ships
(models/kjv-byte: 3.57 M parameters, trained on the whole King James Bible in 84 s on an H100). "kjv-byte-small" is
the earlier shipped model's recipe (1.06 M parameters), which trains on one thread of a 2-core CPU in about 23
minutes. See docs/training.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import MambaExportError


@dataclasses.dataclass(frozen=True)
class Preset:
    """One training run's hyper-parameters.

    Attributes:
        d_model, n_layer, d_state, expand: the model shape (see :class:`mamba_export.config.MambaConfig`).
        seq_len: tokens per training window (the loss is taken on all of them).
        batch_size: windows per optimiser step.
        steps: optimiser steps of the whole run (the cosine schedule decays over these).
        lr: peak learning rate, reached after ``warmup`` steps; decays to ``lr * min_lr_ratio``.
        weight_decay: AdamW decay of the projection and convolution weights (not of A_log, D, norms, biases,
            the embedding).
        grad_clip: maximum global gradient norm.
        eval_every: steps between evaluations (bits per byte on the first ``eval_tokens`` held-out tokens).
        eval_tokens: held-out tokens scored by a periodic evaluation (the final one scores all of them).
        eval_fraction: the share of the text, taken from its end, held out for evaluation.
        save_every: steps between checkpoints (one is always written at the end).
        seed: seeds the initial weights and the order of the training windows.
    """

    d_model: int
    n_layer: int
    seq_len: int
    batch_size: int
    steps: int
    lr: float
    d_state: int = 16
    expand: int = 2
    warmup: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 200
    eval_tokens: int = 16384
    eval_fraction: float = 0.05
    save_every: int = 500
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preset":
        return cls(**d)


PRESETS: dict[str, Preset] = {
    "tiny": Preset(d_model=32, n_layer=2, d_state=8, seq_len=32, batch_size=4, steps=20, lr=3e-3, warmup=4,
                   eval_every=10, eval_tokens=512, save_every=10),
    "kjv-byte": Preset(d_model=256, n_layer=8, seq_len=256, batch_size=32, steps=1800, lr=2e-3, warmup=200,
                       eval_every=250, eval_tokens=16384, save_every=500),
    "kjv-byte-small": Preset(d_model=192, n_layer=4, seq_len=128, batch_size=8, steps=2400, lr=2e-3, warmup=60,
                             eval_every=100, eval_tokens=8192, save_every=100),
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; a :class:`MambaExportError` naming the choices for an unknown one."""
    try:
        return PRESETS[name]
    except KeyError:
        raise MambaExportError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
