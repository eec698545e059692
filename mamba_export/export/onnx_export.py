"""Export a :class:`~mamba_export.model.MambaLM` to the ONNX graphs of docs/CONTRACTS.md, sharing one weights file.

``build_graphs`` runs ``torch.onnx.export`` (the dynamo exporter) on the wrappers of :mod:`.graphs`, with each
custom op translated to one node of the ``ai.mamba_export`` domain, then attaches the model-local fallback functions
(after export: the exporter would inline them). ``save_graphs`` writes the graphs with every large initializer in
one ``weights.bin``: tensors with equal dtype, shape and bytes are stored once and shared by offset, whatever their
names in each graph.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from pathlib import Path

import onnx
import onnx.external_data_helper
import torch
from onnx import numpy_helper

from .. import __version__
from ..model import MambaLM
from . import onnx_ops
from .graphs import DecodeGraph, SequenceGraph, example_inputs, io_names

WEIGHTS_FILE = "weights.bin"
_INLINE_BYTES = 1024  # smaller initializers stay inside the .onnx files
_ALIGN = 64  # offsets in weights.bin are multiples of this, for memory mapping


def _export(module: torch.nn.Module, model: MambaLM, seq_dynamic: bool) -> onnx.ModelProto:
    """Export one wrapper: batch (and seq when ``seq_dynamic``) dynamic, everything else static."""
    batch = torch.export.Dim("batch")
    ids_shape = {0: batch, 1: torch.export.Dim("seq")} if seq_dynamic else {0: batch}
    inputs = example_inputs(model.config, 2, 3 if seq_dynamic else 1)
    names_in, names_out = io_names(model.config.n_layer)
    onnx_ops.register_schemas()
    with warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module.eval(), inputs, dynamo=True, input_names=names_in, output_names=names_out,
            dynamic_shapes=(ids_shape, tuple({0: batch} for _ in inputs[1:])),
            custom_translation_table=onnx_ops.translation_table(), opset_version=onnx_ops.OPSET, verbose=False,
        )
    proto = program.model_proto
    proto.functions.extend(onnx_ops.model_functions())
    proto.producer_name, proto.producer_version = "mamba-export", __version__
    return proto


class _quiet_exporter:
    """Silence the exporter's logging (e.g. skipped torchvision ops) for the duration of an export."""

    def __enter__(self):
        self._logger = logging.getLogger("torch.onnx")
        self._level = self._logger.level
        self._logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self._logger.setLevel(self._level)


def build_graphs(model: MambaLM, last_logits: bool = False) -> dict[str, onnx.ModelProto]:
    """The graphs of an export directory, file name -> model: model.onnx, decode.onnx (and model_last.onnx)."""
    with torch.no_grad():
        graphs = {
            "model.onnx": _export(SequenceGraph(model), model, seq_dynamic=True),
            "decode.onnx": _export(DecodeGraph(model), model, seq_dynamic=False),
        }
        if last_logits:
            graphs["model_last.onnx"] = _export(SequenceGraph(model, last_logits=True), model, seq_dynamic=True)
    return graphs


def _raw_bytes(tensor: onnx.TensorProto) -> bytes:
    """The tensor's little-endian bytes, moving typed fields (float_data, ...) to raw_data first."""
    if not tensor.HasField("raw_data"):
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))
    return tensor.raw_data


def save_graphs(graphs: dict[str, onnx.ModelProto], out_dir: str | os.PathLike) -> None:
    """Write each graph to ``out_dir/<name>`` with its initializers of 1 KiB and more in one shared weights.bin."""
    out = Path(out_dir)
    stored: dict[tuple, tuple[int, int]] = {}  # (data_type, dims, sha256) -> (offset, length)
    with open(out / WEIGHTS_FILE, "wb") as fh:
        for proto in graphs.values():
            for tensor in proto.graph.initializer:
                raw = _raw_bytes(tensor)
                if len(raw) < _INLINE_BYTES:
                    continue
                key = (tensor.data_type, tuple(tensor.dims), hashlib.sha256(raw).digest())
                if key not in stored:
                    fh.write(b"\0" * (-fh.tell() % _ALIGN))
                    stored[key] = (fh.tell(), len(raw))
                    fh.write(raw)
                offset, length = stored[key]
                onnx.external_data_helper.set_external_data(tensor, WEIGHTS_FILE, offset, length)
                tensor.ClearField("raw_data")
    for name, proto in graphs.items():
        onnx.save_model(proto, out / name)


def check_graphs(out_dir: str | os.PathLike, names: list[str]) -> None:
    """onnx.checker with full shape inference on each saved graph (weights read from weights.bin)."""
    onnx_ops.register_schemas()
    for name in names:
        onnx.checker.check_model(str(Path(out_dir) / name), full_check=True)
