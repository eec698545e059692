"""TorchScript export: model.pt, decode.pt (and model_last.pt) with the I/O of the ONNX graphs.

The wrappers of :mod:`.graphs` are traced with the channels-last operators of :mod:`.torch_ops` compiled by
``torch.jit.script`` (so the recurrence over time stays a loop and any batch and sequence length work). The files
load with ``torch.jit.load`` alone, without this package; call them positionally:
``logits, *present = module(input_ids, past_conv_0, past_ssm_0, past_conv_1, ...)``.
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

import torch

from ..model import MambaLM
from . import torch_ops
from .graphs import DecodeGraph, OpSet, SequenceGraph, example_inputs


def scripted_ops() -> OpSet:
    """The operators compiled by ``torch.jit.script`` (reference math inside)."""
    return OpSet(
        torch.jit.script(torch_ops.selective_scan_cl),
        torch.jit.script(torch_ops.causal_conv1d_cl),
        torch.jit.script(torch_ops.decode_step_cl),
        torch.jit.script(torch_ops.rms_norm_cl),
        torch.jit.script(torch_ops.add_rms_norm_cl),
        torch.jit.script(torch_ops.decode_block_cl),
        torch.jit.script(torch_ops.decode_head_cl),
    )


def one_token(input_ids: torch.Tensor) -> torch.Tensor:
    """input_ids itself, or an error unless it is (batch, 1): scripted, so that the check survives decode.pt's trace
    (decode.onnx declares that shape; without this a traced decode.pt took several tokens and returned wrong
    logits)."""
    if input_ids.dim() != 2 or input_ids.size(1) != 1:
        raise RuntimeError("decode.pt takes one token per sequence: input_ids must have shape (batch, 1)")
    return input_ids


class _OneTokenDecode(torch.nn.Module):
    """DecodeGraph behind the one-token check."""

    def __init__(self, decode: DecodeGraph):
        super().__init__()
        self.decode = decode
        self.check = torch.jit.script(one_token)

    def forward(self, input_ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.decode(self.check(input_ids), *past)


def write_torchscript(model: MambaLM, out: Path, last_logits: bool) -> list[str]:
    """Trace and save the modules into ``out``; returns the file names written."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export, but still works
        ops = scripted_ops()
        modules = {"model.pt": (SequenceGraph(model, ops), 3),
                   "decode.pt": (_OneTokenDecode(DecodeGraph(model, ops)), 1)}
        if last_logits:
            modules["model_last.pt"] = (SequenceGraph(model, ops, last_logits=True), 3)
        # saved without requires_grad, so that the modules' outputs are plain inference tensors (.numpy() works, no
        # autograd graph is built); the caller's model gets its flags back
        flags = [(p, p.requires_grad) for p in model.parameters()]
        model.requires_grad_(False)
        try:
            for name, (module, seq) in modules.items():
                traced = torch.jit.trace(module.eval(), example_inputs(model.config, 2, seq), check_trace=False)
                save_without_debug_info(traced, out / name)
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
    return list(modules)


def save_without_debug_info(module: torch.jit.ScriptModule, path: Path) -> None:
    """``torch.jit.save`` without the archive's ``*.debug_pkl`` records: their source ranges name the exporting
    machine's files (this package's and torch's paths), which a shipped model should not carry. ``torch.jit.load``
    does not need them; an error raised inside the module then quotes no TorchScript source."""
    full = path.with_name(path.name + ".full")
    torch.jit.save(module, str(full))
    with zipfile.ZipFile(full) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            if not info.filename.endswith(".debug_pkl"):
                dst.writestr(info, src.read(info.filename))  # one record in memory at a time
    full.unlink()
