"""The public export API: :func:`export_checkpoint` (a checkpoint directory) and :func:`export_model` (a model).

An ONNX export directory holds model.onnx, decode.onnx (and model_last.onnx), weights.bin (and, with float16 decode
weights, decode_weights_f16.bin; with int8 ones, decode_weights_i8.bin), the custom-op library, manifest.json,
genai_config.json and the checkpoint's tokenizer files (docs/CONTRACTS.md, docs/export.md).
A TorchScript export holds model.pt, decode.pt (and model_last.pt), manifest.json and the tokenizer files.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from mamba_runtime.library import LIBRARY_NAME

from .. import __version__, outdir
from ..checkpoint import TOKENIZER_FILES, load_checkpoint, read_config
from ..config import MambaConfig
from ..model import MambaLM
from . import directory, onnx_ops
from .directory import ExportError
from .graphs import DECODE_WEIGHT_DTYPES, decode_blocks_unavailable, io_names
from .onnx_export import DECODE_WEIGHT_FILES

DTYPES = {"float32": torch.float32, "float16": torch.float16}
FORMATS = ("onnx", "torchscript")
DECODE_BLOCK_MODES = ("auto", "on", "off")
GENAI_CONTEXT_LENGTH = 4096  # onnxruntime-genai needs a bound; Mamba itself has none
Progress = Callable[[str], None]


def export_checkpoint(
    ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "float32", last_logits: bool = False,
    fmt: str = "onnx", force: bool = False, with_library: bool = True, decode_weights: str = "float32",
    decode_blocks: str = "auto", progress: Progress | None = None,
) -> Path:
    """Export the checkpoint in ``ckpt_dir`` (either layout) to the directory ``out_dir``.

    Args:
        ckpt_dir: a checkpoint directory (see :mod:`mamba_export.checkpoint`).
        out_dir: the export directory to create (replaced only with ``force``).
        dtype: "float32" or "float16": weights and activations (states are always float32).
        last_logits: also write model_last.onnx / model_last.pt (logits of the last position only).
        fmt: "onnx" or "torchscript".
        force: replace an existing ``out_dir``.
        with_library: copy the custom-op library into the export (ONNX only); it must be built.
        decode_weights: "float32", "float16" or "int8" (ONNX with dtype float32 only): the dtype of decode.onnx's
            in_proj, out_proj and LM head weights; float16 copies are multiplied by the LinearF16W op (half the bytes
            a decode step reads), int8 copies with a float32 scale per output row by LinearI8W (a quarter); the
            prefill graphs keep the float32 weights.
        decode_blocks: "auto", "on" or "off": whether decode.onnx runs each layer as one DecodeBlock
            node and the final norm and LM head as one DecodeHead node (for the CUDA execution provider: lower
            batch-1 decode latency, slower at batch 8 and above; in_proj and out_proj stored a second time,
            untransposed). "auto" (the default) is off for every export; "on" where it does not apply
            (TorchScript, such biases, float16 or int8 decode weights) raises.
        progress: called with a short message at each step.

    Returns:
        The absolute path of the export directory.

    Raises:
        ExportError, CheckpointError: one line saying what is wrong.
    """
    _check_options(dtype, fmt, decode_weights)
    cfg, _, raw = read_config(ckpt_dir)
    resolve_decode_blocks(decode_blocks, cfg, fmt, decode_weights)  # fails before the slow part
    inputs = {"the checkpoint": Path(ckpt_dir)}
    # fail before the slow part (checked again at the end)
    directory.check_target(outdir.output_path(out_dir, ExportError), force, inputs)
    if fmt == "onnx" and with_library:
        directory.library_path()  # raises now, before the slow part, when the library is not built
    say = progress or (lambda msg: None)
    say(f"loading {ckpt_dir} as {dtype}")
    model = load_checkpoint(ckpt_dir, dtype=DTYPES[dtype])
    return export_model(
        model, out_dir, last_logits=last_logits, fmt=fmt, force=force, with_library=with_library,
        decode_weights=decode_weights, decode_blocks=decode_blocks, source_dir=ckpt_dir, token_ids=_token_ids(raw),
        progress=progress,
    )


def export_model(
    model: MambaLM, out_dir: str | os.PathLike, *, last_logits: bool = False, fmt: str = "onnx",
    force: bool = False, with_library: bool = True, decode_weights: str = "float32", decode_blocks: str = "auto",
    source_dir: str | os.PathLike | None = None, token_ids: dict[str, int] | None = None,
    progress: Progress | None = None,
) -> Path:
    """Export ``model`` (float32 or float16 parameters) to the directory ``out_dir``.

    ``source_dir``: a checkpoint directory whose tokenizer files are copied; ``token_ids``: bos/eos/pad token ids
    for genai_config.json (0 when not given). Other arguments as in :func:`export_checkpoint`.
    """
    dtype = next((name for name, dt in DTYPES.items() if dt == model.lm_head.weight.dtype), None)
    if dtype is None:
        raise ExportError(f"model dtype {model.lm_head.weight.dtype} cannot be exported; use float32 or float16")
    _check_options(dtype, fmt, decode_weights)
    blocks = resolve_decode_blocks(decode_blocks, model.config, fmt, decode_weights)
    say = progress or (lambda msg: None)
    if model.config.real_vocab_size < model.config.vocab_size:  # padding rows are no tokens: never sampled, smaller
        say(f"dropping the {model.config.vocab_size - model.config.real_vocab_size} padding rows of the vocabulary "
            f"({model.config.vocab_size} -> {model.config.real_vocab_size})")
        model = model.without_vocab_padding()
    model = model.eval()
    library_path = directory.library_path() if fmt == "onnx" and with_library else None

    def build(tmp: Path) -> None:
        library = None
        if fmt == "onnx":
            from .onnx_export import write_graphs

            graphs = write_graphs(model, tmp, last_logits, say, decode_weights, blocks)
            if library_path is not None:
                # under the contract's name, whatever the built file is called ($MAMBA_EXPORT_OPS_LIBRARY)
                library = shutil.copy2(library_path, tmp / LIBRARY_NAME).name
            directory.write_json(tmp / "genai_config.json", genai_config(model, library, token_ids or {}))
        else:
            from .torchscript import write_torchscript

            say("tracing TorchScript modules")
            graphs = write_torchscript(model, tmp, last_logits)
        tokenizer = directory.copy_tokenizer(Path(source_dir) if source_dir else None, tmp, TOKENIZER_FILES)
        say("writing manifest.json")
        manifest = build_manifest(model, fmt, dtype, graphs, library, tokenizer, directory.file_checksums(tmp),
                                  decode_weights, blocks)
        directory.write_json(tmp / "manifest.json", manifest)

    inputs = {"the checkpoint": Path(source_dir)} if source_dir else {}
    out = directory.write_atomically(out_dir, force, build, inputs)
    say(f"wrote {out}")
    return out


def _check_options(dtype: str, fmt: str, decode_weights: str = "float32") -> None:
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if decode_weights not in DECODE_WEIGHT_DTYPES:
        raise ExportError(f"unknown decode weight dtype {decode_weights!r}; choose one of "
                          f"{', '.join(DECODE_WEIGHT_DTYPES)}")
    if decode_weights != "float32" and fmt != "onnx":
        raise ExportError(f"--decode-weights {decode_weights} is for ONNX exports only, not --format {fmt}")
    if decode_weights != "float32" and dtype != "float32":
        raise ExportError(f"--decode-weights {decode_weights} needs the float32 export (--dtype float32), not --dtype "
                          f"{dtype}")


def resolve_decode_blocks(mode: str, cfg: MambaConfig, fmt: str, decode_weights: str) -> bool:
    """Whether decode.onnx gets DecodeBlock nodes: "on", or "off" / "auto" (auto is off for every export and dtype:
    the fused CUDA kernel is faster only at batch 1).

    Raises:
        ExportError: an unknown mode, or "on" where DecodeBlock does not apply.
    """
    if mode not in DECODE_BLOCK_MODES:
        raise ExportError(f"unknown decode blocks mode {mode!r}; choose one of {', '.join(DECODE_BLOCK_MODES)}")
    why_not = (f"for ONNX exports only, not --format {fmt}" if fmt != "onnx"
               else decode_blocks_unavailable(cfg, decode_weights))
    if mode == "on" and why_not:
        raise ExportError(f"--decode-blocks on: {why_not}")
    return mode == "on"


def _token_ids(raw_config: dict) -> dict[str, int]:
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {k: raw_config[k] for k in keys if isinstance(raw_config.get(k), int)}


def _graph_io(model: MambaLM, graph: str, dtype: str) -> dict:
    """Input and output names, dtypes and shapes (symbolic "batch", "seq") of one graph of the export."""
    c = model.config
    seq = 1 if graph.startswith("decode") else "seq"
    logits_seq = 1 if graph.startswith(("decode", "model_last")) else "seq"
    conv, ssm = ["batch", c.d_inner, c.d_conv - 1], ["batch", c.d_inner, c.d_state]
    names_in, names_out = io_names(c.n_layer)
    spec = lambda name, dt, shape: {"name": name, "dtype": dt, "shape": shape}  # noqa: E731
    inputs = [spec("input_ids", "int64", ["batch", seq])]
    outputs = [spec("logits", dtype, ["batch", logits_seq, c.vocab_size])]
    for name in names_in[1:]:
        inputs.append(spec(name, "float32", conv if name.startswith("past_conv") else ssm))
    for name in names_out[1:]:
        outputs.append(spec(name, "float32", conv if name.startswith("present_conv") else ssm))
    return {"inputs": inputs, "outputs": outputs}


def build_manifest(
    model: MambaLM, fmt: str, dtype: str, graphs: list[str], library: str | None, tokenizer: list[str],
    files: dict[str, dict], decode_weights: str = "float32", decode_blocks: bool = False,
) -> dict:
    """manifest.json: what a runtime needs to know about the export, and the sha256 of every file.

    ``decode_weight_dtype``: "float16" or "int8" when decode.onnx reads narrow copies of its in_proj, out_proj and LM
    head weights, "float32" when it reads the export's own (float32, or float16 with ``--dtype float16``); null for
    TorchScript; ``decode_weights_file``: where the float16 or int8 copies are (null for float32); ``decode_blocks``:
    whether decode.onnx runs every layer as one DecodeBlock node (null for TorchScript)."""
    c = model.config
    return {
        "format_version": directory.FORMAT_VERSION,
        "producer": {"name": "mamba-export", "version": __version__, "torch": torch.__version__},
        "format": fmt,
        "config": c.to_dict(),
        "dtype": dtype,
        "dtypes": {"weights": dtype, "activations": dtype, "logits": dtype, "states": "float32", "input_ids": "int64"},
        "graphs": {name: _graph_io(model, name, dtype) for name in graphs},
        "state_layout": {
            "per_layer": ["past_conv.{i}", "past_ssm.{i}"],
            "conv": {"shape": ["batch", c.d_inner, c.d_conv - 1], "dtype": "float32",
                     "meaning": "the last d_conv - 1 inputs of the layer's causal convolution, oldest first"},
            "ssm": {"shape": ["batch", c.d_inner, c.d_state], "dtype": "float32", "meaning": "the SSM state h"},
            "start": "zeros",
        },
        "ops": {"domain": onnx_ops.DOMAIN, "version": onnx_ops.DOMAIN_VERSION, "names": list(onnx_ops.OP_NAMES),
                "fallback": "model-local ONNX functions of standard ops"} if fmt == "onnx" else None,
        "custom_op_library": library,
        "weights": "weights.bin" if fmt == "onnx" else None,
        "decode_weight_dtype": decode_weights if fmt == "onnx" else None,
        "decode_weights_file": DECODE_WEIGHT_FILES[decode_weights][0]
        if fmt == "onnx" and decode_weights in DECODE_WEIGHT_FILES else None,
        "decode_blocks": decode_blocks if fmt == "onnx" else None,
        "tokenizer": {"files": tokenizer},
        "files": files,
    }


def genai_config(model: MambaLM, library: str | None, token_ids: dict[str, int]) -> dict:
    """genai_config.json for onnxruntime-genai: a "decoder" whose cache is the per-layer recurrent state."""
    session_options: dict = {"log_id": "onnxruntime-genai", "provider_options": []}
    if library:
        session_options["custom_ops_library"] = library
    c = model.config
    return {
        "model": {
            "type": "decoder",
            "vocab_size": c.vocab_size,
            "context_length": GENAI_CONTEXT_LENGTH,
            "bos_token_id": token_ids.get("bos_token_id", 0),
            "eos_token_id": token_ids.get("eos_token_id", 0),
            "pad_token_id": token_ids.get("pad_token_id", 0),
            "decoder": {
                "filename": "model.onnx",
                "session_options": session_options,
                "num_hidden_layers": c.n_layer,
                "inputs": {"input_ids": "input_ids", "past_conv_names": "past_conv.%d",
                           "past_recurrent_names": "past_ssm.%d"},
                "outputs": {"logits": "logits", "present_conv_names": "present_conv.%d",
                            "present_recurrent_names": "present_ssm.%d"},
            },
        },
        "search": {"max_length": GENAI_CONTEXT_LENGTH},
    }
