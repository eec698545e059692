"""Export a :class:`~mamba_export.model.MambaLM` to the ONNX graphs of docs/CONTRACTS.md, sharing one weights file.

Each graph is a wrapper of :mod:`.graphs` exported by ``torch.onnx.export`` (the dynamo exporter), with each custom
op translated to one node of the ``ai.mamba_export`` domain; the model-local fallback functions are attached after
export (the exporter would inline them). Graphs are written one at a time, each as soon as it is exported, with
every initializer of 1 KiB or more in one ``weights.bin``: tensors with equal dtype, shape and bytes are stored once
and shared by offset whatever their names, so model.onnx, decode.onnx and model_last.onnx share the weights. The
initializers are moved to the file in the exporter's IR model, a tensor at a time, before it is turned into a
ModelProto: a ModelProto holding them would be a second copy of the weights (peak RSS 9.47 GiB instead of 3.80 for
a 793M-parameter float32 model, docs/export.md). With float16 (int8) decode weights, decode.onnx's float16 (int8)
copies of in_proj, out_proj and the LM head (with the int8 ones' float32 row scales) go to their own
``decode_weights_f16.bin`` (``decode_weights_i8.bin``) instead; the rest of decode.onnx still points into
weights.bin, which is byte for byte that of the float32 export.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import warnings
from pathlib import Path
from typing import BinaryIO, Callable

import onnx
import onnx_ir as ir
import torch

from .. import __version__
from ..model import MambaLM
from . import onnx_ops
from .graphs import DecodeGraph, SequenceGraph, example_inputs, io_names

WEIGHTS_FILE = "weights.bin"
DECODE_F16_WEIGHTS_FILE = "decode_weights_f16.bin"  # decode.onnx's float16 matrices (--decode-weights float16)
DECODE_I8_WEIGHTS_FILE = "decode_weights_i8.bin"  # decode.onnx's int8 matrices (--decode-weights int8)
# --decode-weights dtype -> (the file of decode.onnx's narrow matrices, their ONNX dtype)
DECODE_WEIGHT_FILES = {"float16": (DECODE_F16_WEIGHTS_FILE, ir.DataType.FLOAT16),
                       "int8": (DECODE_I8_WEIGHTS_FILE, ir.DataType.INT8)}
_INLINE_BYTES = 1024  # smaller initializers stay inside the .onnx files
_ALIGN = 64  # offsets in weights.bin are multiples of this, for memory mapping


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's warnings and logging (deprecations, skipped torchvision ops) during an export."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def export_graph(module: torch.nn.Module, model: MambaLM, seq_dynamic: bool) -> ir.Model:
    """Export one wrapper: batch (and seq when ``seq_dynamic``) dynamic, all else static. The IR model's initializers
    still hold the module's tensors (no copy): :class:`SharedWeights` moves them out, :func:`to_proto` serialises."""
    batch = torch.export.Dim("batch")
    ids_shape = {0: batch, 1: torch.export.Dim("seq")} if seq_dynamic else {0: batch}
    inputs = example_inputs(model.config, 2, 3 if seq_dynamic else 1)
    names_in, names_out = io_names(model.config.n_layer)
    onnx_ops.register_schemas()
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            module.eval(), inputs, dynamo=True, input_names=names_in, output_names=names_out,
            dynamic_shapes=(ids_shape, tuple({0: batch} for _ in inputs[1:])),
            custom_translation_table=onnx_ops.translation_table(), opset_version=onnx_ops.OPSET, verbose=False,
        )
    return program.model


def to_proto(graph: ir.Model) -> onnx.ModelProto:
    """The ModelProto of an exported graph, with the fallback functions of the custom ops attached and without the
    exporter's per-node metadata: its stack traces name the exporting machine's source paths (/home/..., a project's
    directory) and made half of model.onnx's bytes, and without them an export does not depend on where it ran."""
    proto = ir.serde.serialize_model(graph)
    for node in proto.graph.node:
        del node.metadata_props[:]
    proto.functions.extend(onnx_ops.model_functions())
    proto.producer_name, proto.producer_version = "mamba-export", __version__
    return proto


class SharedWeights:
    """An external-data file being written (``location``, e.g. weights.bin): moves a graph's large initializers into
    it, each distinct tensor once."""

    def __init__(self, fh: BinaryIO, location: str = WEIGHTS_FILE):
        self._fh = fh
        self._location = location
        self._stored: dict[tuple, tuple[int, int]] = {}  # (dtype, dims, sha256) -> (offset, length)

    def externalize(self, graph: ir.Model, select: Callable[[ir.Value], bool] = lambda v: True) -> None:
        """Point every initializer of 1 KiB or more of ``graph`` that ``select`` accepts (given its ir.Value), and
        that is not in a file yet, into this file, writing the ones not yet there (one tensor's bytes in memory at a
        time)."""
        for value in graph.graph.initializers.values():
            tensor = value.const_value
            if tensor is None or isinstance(tensor, ir.ExternalTensor) or not select(value):
                continue
            if tensor.nbytes < _INLINE_BYTES:
                continue
            raw = tensor.tobytes()
            key = (tensor.dtype, tuple(tensor.shape.numpy()), hashlib.sha256(raw).digest())
            if key not in self._stored:
                self._fh.write(b"\0" * (-self._fh.tell() % _ALIGN))
                self._stored[key] = (self._fh.tell(), len(raw))
                self._fh.write(raw)
            del raw
            offset, length = self._stored[key]
            value.const_value = ir.ExternalTensor(self._location, offset, length, tensor.dtype, shape=tensor.shape,
                                                  name=value.name)


def _is_narrow_weight(value: ir.Value, dtype: ir.DataType) -> bool:
    """Whether an initializer of decode.onnx belongs in the narrow-weights file: a matrix of that dtype, or the scales
    of an int8 one (LinearI8W's input S), so that weights.bin stays that of the float32 export."""
    return value.const_value.dtype == dtype or any(
        node.op_type == "LinearI8W" and index == 2 for node, index in value.uses())


def write_graphs(
    model: MambaLM, out: Path, last_logits: bool, say: Callable[[str], None], decode_weights: str = "float32",
    decode_blocks: bool = False,
) -> list[str]:
    """Export, write and check model.onnx, decode.onnx (and model_last.onnx) and weights.bin in ``out``; with
    ``decode_weights="float16"`` also decode_weights_f16.bin, decode.onnx's float16 in_proj, out_proj and LM head
    (``"int8"``: decode_weights_i8.bin, their int8 values).
    With ``decode_blocks`` decode.onnx runs every layer as one DecodeBlock node, whose in_proj and out_proj
    weights (nn.Linear layout) are stored in weights.bin beside model.onnx's transposed ones, and ends with one
    DecodeHead, whose LM head weight is in that layout too (a tied model's embedding table, stored already).

    Returns:
        The graph file names written.
    """
    wrappers = {
        "model.onnx": (SequenceGraph(model), True),
        "decode.onnx": (DecodeGraph(model, decode_weights=decode_weights, decode_blocks=decode_blocks), False),
    }
    if last_logits:
        wrappers["model_last.onnx"] = (SequenceGraph(model, last_logits=True), True)
    with contextlib.ExitStack() as files:
        weights = SharedWeights(files.enter_context(open(out / WEIGHTS_FILE, "wb")))
        narrow = None
        if decode_weights in DECODE_WEIGHT_FILES:
            narrow_file, narrow_dtype = DECODE_WEIGHT_FILES[decode_weights]
            narrow = SharedWeights(files.enter_context(open(out / narrow_file, "wb")), narrow_file)
        for name, (module, seq_dynamic) in wrappers.items():
            say(f"exporting {name}")
            graph = export_graph(module, model, seq_dynamic)
            if narrow is not None and name == "decode.onnx":
                narrow.externalize(graph, lambda v: _is_narrow_weight(v, narrow_dtype))
            weights.externalize(graph)
            onnx.save_model(to_proto(graph), out / name)
            del graph
    say("checking the graphs (onnx.checker, full shape inference)")
    check_graphs(out, list(wrappers))
    return list(wrappers)


def check_graphs(out: Path, names: list[str]) -> None:
    """onnx.checker with full shape inference on each saved graph (weights read from their external-data files)."""
    onnx_ops.register_schemas()
    for name in names:
        onnx.checker.check_model(str(out / name), full_check=True)
