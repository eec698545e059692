"""Argument checks shared by the launchers: every kernel sees tensors of the shapes, dtypes and device it expects."""

from __future__ import annotations

import os

import torch

from mamba_export.errors import MambaExportError

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class KernelInputError(MambaExportError, ValueError):
    """A tensor handed to a Triton kernel has the wrong shape, dtype, device or layout."""


def check_tensor(name: str, t: torch.Tensor | None, shape: tuple[int, ...], device: torch.device) -> None:
    """Raise :class:`KernelInputError` unless ``t`` (when not None) has ``shape``, a kernel dtype and ``device``."""
    if t is None:
        return
    if tuple(t.shape) != tuple(shape):
        raise KernelInputError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype not in KERNEL_DTYPES:
        raise KernelInputError(
            f"{name} has dtype {t.dtype}; the Triton kernels take float32, float16 or bfloat16 "
            "(use the reference backend for float64)"
        )
    if t.device != device:
        raise KernelInputError(f"{name} is on {t.device}, the other inputs on {device}")


def check_row_offsets(name: str, t: torch.Tensor | None) -> None:
    """Raise :class:`KernelInputError` if one batch row of ``t`` (all dimensions but the first) spans 2**31 elements or
    more: the kernels index within a row with 32-bit integers (the batch offset is 64-bit)."""
    if t is None or t.dim() < 2 or t.numel() == 0:
        return
    span = sum((size - 1) * abs(stride) for size, stride in zip(t.shape[1:], t.stride()[1:]))
    if span >= 2**31:
        raise KernelInputError(
            f"{name} {tuple(t.shape)} with strides {tuple(t.stride())}: one batch row spans {span + 1} elements; the "
            "Triton kernels address up to 2**31 elements within a row (split the sequence and pass the state on)"
        )


def check_runnable(device: torch.device) -> None:
    """Triton runs CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (the CI tests)."""
    if device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return
    raise KernelInputError(f"the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU), got {device}")


def contiguous_or_none(t: torch.Tensor | None) -> torch.Tensor | None:
    """A parameter (A, D, a bias, a filter) made contiguous: it is tiny, so the copy, if any, costs nothing."""
    return None if t is None else t.contiguous()


def empty_like_bdl(t: torch.Tensor) -> torch.Tensor:
    """An uninitialised dense (b, d, l) tensor laid out as t is: time-major (channels contiguous) where t's channel
    stride is the smaller, else contiguous. ``torch.empty_like`` gives a view's gradient (z and x are (b, d, l) views
    of in_proj's (b, l, 2d) output) the contiguous layout, and autograd's concatenation into (b, l, 2d) then has to
    transpose it."""
    b, d, l = t.shape
    if d > 1 and l > 1 and t.stride(1) < t.stride(2):
        return torch.empty(b, l, d, dtype=t.dtype, device=t.device).transpose(1, 2)
    return torch.empty(b, d, l, dtype=t.dtype, device=t.device)
