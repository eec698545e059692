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


def parser(doc: str):
    """An argparse parser whose --help shows the script's whole docstring as written (its usage examples included)
    and each option's default (unless its help already says it, or it has none)."""
    import argparse

    class Formatter(argparse.RawDescriptionHelpFormatter):
        def _get_help_string(self, action):
            text = action.help or ""
            if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
                return text
            return f"{text} (default: %(default)s)"

    class Parser(argparse.ArgumentParser):
        def add_argument(self, *args, **kwargs):
            # argparse prints no line at all for an option without help: give it one with its default
            if kwargs.get("help") is None and kwargs.get("default") not in (None, False):
                kwargs["help"] = "default: %(default)s"
            return super().add_argument(*args, **kwargs)

    return Parser(description=doc, formatter_class=Formatter)
