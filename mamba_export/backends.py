"""Explicit choice of the implementation of the sequence operators the model calls.

A backend is a named set of five functions with the signatures of the references in :mod:`mamba_export.ops`.
The model is built with a backend name and reports it (``model.backend.name``); nothing falls back silently:
asking for ``"triton"`` where Triton cannot run is an error, and ``"auto"`` picks Triton on CUDA tensors and the
reference elsewhere, deciding once, when the model is built or moved.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from . import ops
from .errors import MambaExportError

BACKEND_NAMES = ("reference", "triton", "auto", "fast")


@dataclasses.dataclass(frozen=True)
class Backend:
    """A named set of the sequence operators (see :mod:`mamba_export.ops` for their contracts)."""

    name: str
    selective_scan: Callable
    causal_conv1d: Callable
    causal_conv1d_step: Callable
    selective_state_update: Callable
    add_rms_norm: Callable


REFERENCE = Backend(
    name="reference",
    selective_scan=ops.selective_scan_ref,
    causal_conv1d=ops.causal_conv1d_ref,
    causal_conv1d_step=ops.causal_conv1d_step_ref,
    selective_state_update=ops.selective_state_update_ref,
    add_rms_norm=ops.add_rms_norm_ref,
)


# The reference operators, except a selective scan whose backward is linear in the sequence length: for training
# on CPU (the reference's autograd through its per-step loop is quadratic).
FAST = dataclasses.replace(REFERENCE, name="fast", selective_scan=ops.selective_scan_fast)


def _triton_backend() -> Backend:
    try:
        import mamba_kernels
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise MambaExportError(f"backend 'triton' is not available: {e}") from e
    return mamba_kernels.BACKEND


def resolve_backend(name: str, device_type: str = "cpu") -> Backend:
    """Return the backend called ``name`` ("reference", "triton" or "auto") for tensors on ``device_type``."""
    if name == "reference":
        return REFERENCE
    if name == "triton":
        return _triton_backend()
    if name == "fast":
        return FAST
    if name == "auto":
        return _triton_backend() if device_type == "cuda" else REFERENCE
    raise MambaExportError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
