"""Argument checks shared by the tools: the GPU tools' first check (one line and exit status 2 on a machine without
what they need, before any work) and an argparse type for counts."""

from __future__ import annotations

import sys


def require_cuda(tool: str, onnxruntime: bool = False) -> None:
    """Exit unless torch sees a CUDA device (or, with ``onnxruntime``, unless onnxruntime has its CUDA provider)."""
    if onnxruntime:
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            _refuse(f"{tool}: needs onnxruntime's CUDA provider (onnxruntime-gpu on a machine with a CUDA GPU; "
                    "docs/gpu.md); this onnxruntime has only " + ", ".join(ort.get_available_providers()))
        return
    import torch

    if not torch.cuda.is_available():
        _refuse(f"{tool}: needs a CUDA GPU (torch {torch.__version__} sees none); run it on the GPU machine "
                "(docs/gpu.md)")


def _refuse(message: str) -> None:
    print(message, file=sys.stderr)
    sys.exit(2)


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (a count of rounds, steps, rows ...), else argparse's one-line error."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, found {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, found {text!r}")
    return value
