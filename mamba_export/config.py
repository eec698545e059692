"""The model configuration, and its translation from the two config.json dialects users have.

One dataclass, :class:`MambaConfig`, holds every hyper-parameter the reference model needs, already resolved
(``dt_rank`` is a number, ``vocab_size`` is padded). ``from_state_spaces`` and ``from_transformers`` read the
dictionaries of state-spaces/mamba's and Hugging Face transformers' ``config.json``; ``to_state_spaces`` writes the
former, which is also this project's own checkpoint layout.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from .errors import ConfigError

# state-spaces/mamba's defaults (mamba_ssm.models.config_mamba.MambaConfig and mamba_ssm.modules.mamba_simple.Mamba).
_SS_DEFAULTS: dict[str, Any] = {
    "d_model": 2560,
    "d_intermediate": 0,
    "n_layer": 64,
    "vocab_size": 50277,
    "rms_norm": True,
    "residual_in_fp32": True,
    "fused_add_norm": True,
    "pad_vocab_size_multiple": 8,
    "tie_embeddings": True,
}
_SS_SSM_DEFAULTS: dict[str, Any] = {
    "d_state": 16,
    "d_conv": 4,
    "expand": 2,
    "dt_rank": "auto",
    "bias": False,
    "conv_bias": True,
}


_MAX_SIZE = 2**31 - 1  # every size must fit the kernels' 32-bit indexing (and an allocation)


def _int(value: Any, name: str) -> int:
    """A size from config.json: an integer (2.0 is accepted as 2; 256.7, "256" and true are errors)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"config: {name} must be an integer, found {value!r}")
    return value


def _rank(value: Any, name: str) -> int:
    """The Δ projection's rank: "auto" (0 here: ceil(d_model / 16)) or a positive integer."""
    if value == "auto":
        return 0
    rank = _int(value, name)
    if rank < 1:
        raise ConfigError(f"config: {name} must be a positive integer or \"auto\", found {value!r}")
    return rank


def _pad_multiple(real: int, rows: int) -> int:
    """A pad_vocab_size_multiple that pads ``real`` token ids to ``rows`` (state-spaces' rounding up): the powers of
    two that divide ``rows`` first, largest first (the multiples people use: 8, 16, 64 ...), then the smallest."""
    if real == rows:
        return 1
    powers = [1 << k for k in range(rows.bit_length() - 1, -1, -1) if rows % (1 << k) == 0]
    for m in [*powers, *range(1, min(rows, 4096) + 1)]:
        if -(-real // m) * m == rows:
            return m
    return rows  # rounds every real <= rows up to rows


def _flag(value: Any, name: str) -> bool:
    """A switch from config.json: true or false (the string "false" would otherwise read as true)."""
    if not isinstance(value, bool):
        raise ConfigError(f"config: {name} must be true or false, found {value!r}")
    return value


def _eps(value: Any, name: str) -> float:
    """The norms' epsilon: a finite positive number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"config: {name} must be a positive number, found {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class MambaConfig:
    """Resolved hyper-parameters of a Mamba-1 language model.

    Attributes:
        d_model: residual stream width D.
        n_layer: number of Mamba blocks.
        vocab_size: rows of the embedding and of the LM head (already padded to a multiple, where the checkpoint pads).
        real_vocab_size: the token ids the model was made for, [0, real_vocab_size); the rows past it are padding,
            which exports cut off (0: all of vocab_size).
        d_state: SSM state size N per channel.
        d_conv: causal depthwise convolution width K.
        expand: E, so that the inner width is ``d_inner = E * D``.
        dt_rank: R, the rank of the Δ projection.
        bias: whether in_proj and out_proj have biases.
        conv_bias: whether the depthwise convolution has a bias.
        norm_eps: epsilon of the RMSNorms.
        tie_embeddings: whether the LM head shares the embedding matrix.
        residual_in_fp32: keep the residual stream in float32 when the weights are float16/bfloat16.
        d_inner_override: the inner width when it is not ``expand * d_model`` (transformers' ``intermediate_size``).
    """

    d_model: int
    n_layer: int
    vocab_size: int
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int = 0
    bias: bool = False
    conv_bias: bool = True
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    residual_in_fp32: bool = True
    d_inner_override: int = 0
    real_vocab_size: int = 0

    def __post_init__(self) -> None:
        if self.dt_rank == 0:
            object.__setattr__(self, "dt_rank", math.ceil(self.d_model / 16))
        if self.real_vocab_size == 0:
            object.__setattr__(self, "real_vocab_size", self.vocab_size)
        for name in ("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand", "dt_rank", "real_vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"config: {name} must be a positive integer, found {value!r}")
            if value > _MAX_SIZE:
                raise ConfigError(f"config: {name} is {value}, more than this tool supports ({_MAX_SIZE})")
        inner = self.d_inner_override
        if isinstance(inner, bool) or not isinstance(inner, int) or inner < 0:
            raise ConfigError(f"config: d_inner_override must be an integer >= 0, found {inner!r}")
        if self.d_inner > _MAX_SIZE:
            raise ConfigError(f"config: the inner width is {self.d_inner}, more than this tool supports ({_MAX_SIZE})")
        if self.d_conv < 2:
            raise ConfigError(f"config: d_conv must be at least 2, found {self.d_conv}")
        if self.real_vocab_size > self.vocab_size:
            raise ConfigError(f"config: real_vocab_size {self.real_vocab_size} is more than vocab_size "
                              f"{self.vocab_size}")
        _eps(self.norm_eps, "norm_eps")
        for name in ("bias", "conv_bias", "tie_embeddings", "residual_in_fp32"):
            _flag(getattr(self, name), name)

    @property
    def d_inner(self) -> int:
        """Inner width of the mixer (number of SSM channels)."""
        return self.d_inner_override or self.expand * self.d_model

    # ---- state-spaces/mamba -------------------------------------------------------------------------------------
    @classmethod
    def from_state_spaces(cls, cfg: dict[str, Any]) -> "MambaConfig":
        """Read state-spaces/mamba's config.json dictionary; missing keys take that project's defaults."""
        c = {**_SS_DEFAULTS, **cfg}
        ssm = {**_SS_SSM_DEFAULTS, **(c.get("ssm_cfg") or {})}
        layer = ssm.pop("layer", "Mamba1")
        if layer != "Mamba1":
            raise ConfigError(f"config: ssm_cfg.layer is {layer!r}; only Mamba1 models are supported")
        if c.get("d_intermediate", 0):
            raise ConfigError("config: d_intermediate > 0 (an MLP after each mixer) is not supported")
        if c.get("attn_layer_idx"):
            raise ConfigError("config: attn_layer_idx (hybrid attention layers) is not supported")
        if not _flag(c["rms_norm"], "rms_norm"):
            raise ConfigError("config: rms_norm is false (LayerNorm models) which is not supported")
        real = vocab = _int(c["vocab_size"], "vocab_size")
        if vocab < 1:
            raise ConfigError(f"config: vocab_size must be a positive integer, found {vocab}")
        multiple = _int(c.get("pad_vocab_size_multiple") or 1, "pad_vocab_size_multiple")
        if multiple < 1:
            raise ConfigError(f"config: pad_vocab_size_multiple must be positive, found {multiple}")
        if vocab % multiple:
            vocab += multiple - vocab % multiple
        return cls(
            d_model=_int(c["d_model"], "d_model"),
            n_layer=_int(c["n_layer"], "n_layer"),
            vocab_size=vocab,
            real_vocab_size=real,
            d_state=_int(ssm["d_state"], "d_state"),
            d_conv=_int(ssm["d_conv"], "d_conv"),
            expand=_int(ssm["expand"], "expand"),
            dt_rank=_rank(ssm["dt_rank"], "dt_rank"),
            bias=_flag(ssm["bias"], "bias"),
            conv_bias=_flag(ssm["conv_bias"], "conv_bias"),
            norm_eps=_eps(c.get("norm_epsilon", 1e-5), "norm_epsilon"),
            tie_embeddings=_flag(c["tie_embeddings"], "tie_embeddings"),
            residual_in_fp32=_flag(c["residual_in_fp32"], "residual_in_fp32"),
        )

    def to_state_spaces(self) -> dict[str, Any]:
        """This config as state-spaces/mamba's config.json dictionary: vocab_size the real one, with a
        pad_vocab_size_multiple that pads it to the rows of the weights."""
        if self.d_inner_override and self.d_inner_override != self.expand * self.d_model:
            raise ConfigError("config: an inner width that is not expand * d_model has no state-spaces form")
        return {
            "d_model": self.d_model,
            "d_intermediate": 0,
            "n_layer": self.n_layer,
            "vocab_size": self.real_vocab_size,
            "ssm_cfg": {
                "layer": "Mamba1",
                "d_state": self.d_state,
                "d_conv": self.d_conv,
                "expand": self.expand,
                "dt_rank": self.dt_rank,
                "bias": self.bias,
                "conv_bias": self.conv_bias,
            },
            "rms_norm": True,
            "norm_epsilon": self.norm_eps,
            "residual_in_fp32": self.residual_in_fp32,
            "fused_add_norm": True,
            "pad_vocab_size_multiple": _pad_multiple(self.real_vocab_size, self.vocab_size),
            "tie_embeddings": self.tie_embeddings,
        }

    # ---- Hugging Face transformers --------------------------------------------------------------------------------
    @classmethod
    def from_transformers(cls, cfg: dict[str, Any]) -> "MambaConfig":
        """Read transformers' MambaConfig config.json dictionary; missing keys take transformers' defaults."""
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ConfigError(f"config: hidden_act {act!r} is not supported (only silu)")
        hidden = _int(cfg.get("hidden_size", 768), "hidden_size")
        expand = _int(cfg.get("expand", 2), "expand")
        inner = _int(cfg.get("intermediate_size", expand * hidden), "intermediate_size")
        if inner < 1:
            raise ConfigError(f"config: intermediate_size must be a positive integer, found {inner}")
        return cls(
            d_model=hidden,
            n_layer=_int(cfg.get("num_hidden_layers", 32), "num_hidden_layers"),
            vocab_size=_int(cfg.get("vocab_size", 50280), "vocab_size"),
            d_state=_int(cfg.get("state_size", 16), "state_size"),
            d_conv=_int(cfg.get("conv_kernel", 4), "conv_kernel"),
            expand=expand,
            dt_rank=_rank(cfg.get("time_step_rank", "auto"), "time_step_rank"),
            bias=_flag(cfg.get("use_bias", False), "use_bias"),
            conv_bias=_flag(cfg.get("use_conv_bias", True), "use_conv_bias"),
            norm_eps=_eps(cfg.get("layer_norm_epsilon", 1e-5), "layer_norm_epsilon"),
            tie_embeddings=_flag(cfg.get("tie_word_embeddings", True), "tie_word_embeddings"),
            residual_in_fp32=_flag(cfg.get("residual_in_fp32", True), "residual_in_fp32"),
            d_inner_override=0 if inner == expand * hidden else inner,
        )

    def to_dict(self) -> dict[str, Any]:
        """All fields plus the derived d_inner, for manifests and logs."""
        return {**dataclasses.asdict(self), "d_inner": self.d_inner}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MambaConfig":
        """Inverse of :meth:`to_dict` (extra keys such as d_inner are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
