"""``mamba-export export CHECKPOINT_DIR -o OUT_DIR``: write an ONNX (or TorchScript) export directory."""

from __future__ import annotations

import argparse
import sys
import time


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a checkpoint to an ONNX (or TorchScript) directory",
        description="Export a Mamba-1 checkpoint (state-spaces/mamba or transformers layout) to OUT_DIR: model.onnx "
        "(any number of new tokens), decode.onnx (one token), weights.bin, the custom-op library, manifest.json, "
        "genai_config.json and the checkpoint's tokenizer files. The graphs use the ai.mamba_export custom ops and "
        "also carry them as ONNX functions, so a stock onnxruntime runs them without the library (slower). "
        "OUT_DIR is written atomically: a failed export leaves nothing.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="directory with config.json and the weights")
    p.add_argument("-o", "--output", metavar="OUT_DIR", required=True, help="export directory to create")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="weights and activations (states stay float32); default float32")
    p.add_argument("--last-logits", action="store_true",
                   help="also write model_last.onnx, whose logits are those of the last position only")
    p.add_argument("--format", dest="fmt", choices=("onnx", "torchscript"), default="onnx",
                   help="onnx (default) or torchscript (model.pt and decode.pt, for torch.jit.load)")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--no-library", dest="with_library", action="store_false",
                   help="do not copy the custom-op library into OUT_DIR: a runtime then registers the one it finds "
                   "itself (mamba-export generate: this package's build or $MAMBA_EXPORT_OPS_LIBRARY), and a stock "
                   "onnxruntime runs the graphs' ONNX functions")
    p.add_argument("--decode-weights", choices=("float32", "float16", "int8"), default="float32",
                   help="dtype of decode.onnx's in_proj, out_proj and LM head weights (only with --dtype float32 and "
                   "--format onnx). float16 stores half-size copies in decode_weights_f16.bin and multiplies them "
                   "with the LinearF16W op, which widens them to float32 in registers: a decode step reads half the "
                   "bytes, at float16 weight rounding. int8 stores quarter-size copies, one float32 scale per "
                   "output row, in decode_weights_i8.bin (op LinearI8W): the fastest CPU decode at small batches "
                   "(at 16 sequences and more the float32 export is faster), at int8 weight rounding "
                   "(docs/export.md measures what it costs). Activations, sums, states and the prefill "
                   "graphs stay float32; default float32")
    p.add_argument("--decode-blocks", choices=("auto", "on", "off"), default="auto",
                   help="on: decode.onnx runs every layer as one DecodeBlock node (norm, in_proj, "
                   "mixer and out_proj fused into one op for the CUDA execution provider) and the final norm and LM "
                   "head as one DecodeHead node. It lowers batch-1 decode "
                   "latency on the GPU but is slower at batch 8 and above (its matrix products do not use cuBLAS); "
                   "weights.bin then holds in_proj and out_proj a second time, untransposed, so it grows by about "
                   "60%%. Not with --format torchscript, --decode-weights float16/int8 or models with in_proj/out_proj "
                   "bias. Default off (auto, the default value, means off for every export)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..export import export_checkpoint

    start = time.monotonic()

    def progress(msg: str) -> None:
        print(f"[{time.monotonic() - start:5.1f}s] {msg}", file=sys.stderr, flush=True)

    out = export_checkpoint(
        args.checkpoint, args.output, dtype=args.dtype, last_logits=args.last_logits, fmt=args.fmt,
        force=args.force, with_library=args.with_library, decode_weights=args.decode_weights,
        decode_blocks=args.decode_blocks, progress=progress,
    )
    print(out)
    return 0
