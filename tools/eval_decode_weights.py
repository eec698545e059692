#!/usr/bin/env python3
"""What narrow decode weights cost in quality: held-out bits per token through decode.onnx, float32 against float16
and int8 decode weights (``mamba-export export --decode-weights``), all exported from one checkpoint in one run.

The checkpoint (default: the shipped ``models/kjv-byte``) is exported three times; each export's decode.onnx then
reads the same held-out text, teacher-forced one token a step: ``--streams`` sequences of ``--tokens`` tokens each,
taken at evenly spaced places of the last ``--eval-fraction`` of the text (the part ``mamba-export train`` holds out,
by default the whole 5% of data/kjv.txt the shipped model never trained on), all in one batch, every token a decode
step (the prefill graph is not involved). For each export it prints:

    bits/token:        mean -log2 p(next token) over all predicted tokens (for a byte-level model, bits per byte);
    vs float32:        the difference to the float32 export's;
    top-1 agreement:   how often its most likely next token is the float32 export's;
    KL (bits/token):   mean KL(p_float32 || p_this), in bits;
    max |d logp|:      the largest change of any log-probability of a predicted token (nats).

Not a test. Usage:

    .venv/bin/python tools/eval_decode_weights.py [--checkpoint models/kjv-byte] [--text data/kjv.txt]
        [--eval-fraction 0.05] [--streams 32] [--tokens 1024] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from tool_args import parser as tool_parser, positive_int

ROOT = Path(__file__).resolve().parents[1]
DTYPES = ("float32", "float16", "int8")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def decode_logprobs(export: Path, ids: np.ndarray, threads: int) -> np.ndarray:
    """Teacher-forced log-probabilities (streams, tokens - 1, V) of decode.onnx over ``ids`` (streams, tokens)."""
    import onnxruntime as ort

    from mamba_runtime import custom_op_library_path
    from mamba_runtime.sessions import session_options

    so = session_options(threads, custom_op_library_path())
    sess = ort.InferenceSession(str(export / "decode.onnx"), so, providers=["CPUExecutionProvider"])
    b = ids.shape[0]
    state = {i.name: np.zeros([b, *i.shape[1:]], np.float32) for i in sess.get_inputs()[1:]}
    out_names = [o.name for o in sess.get_outputs()]
    steps = []
    for t in range(ids.shape[1] - 1):
        outs = sess.run(out_names, {"input_ids": ids[:, t:t + 1], **state})
        steps.append(log_softmax(outs[0][:, 0]))
        state = {name.replace("present", "past"): v for name, v in zip(out_names[1:], outs[1:])}
    return np.stack(steps, axis=1)


def held_out_ids(checkpoint: Path, text_path: Path, eval_fraction: float, streams: int, tokens: int) -> np.ndarray:
    """``streams`` windows of ``tokens`` ids at evenly spaced offsets of the held-out part of the text, encoded and
    split as ``mamba-export train`` does (the checkpoint's tokenizer.json, or bytes)."""
    from mamba_export.training.data import TOKENIZER_FILE, load_corpus

    tokenizer = checkpoint / TOKENIZER_FILE
    corpus = load_corpus(text_path, eval_fraction, tokens, str(tokenizer) if tokenizer.is_file() else None)
    heldout = corpus.heldout.numpy()
    offsets = np.linspace(0, len(heldout) - tokens, streams).astype(np.int64)
    return np.stack([heldout[o:o + tokens] for o in offsets])


def main() -> None:
    ap = tool_parser(__doc__)
    ap.add_argument("--checkpoint", type=Path, default=ROOT / "models" / "kjv-byte")
    ap.add_argument("--text", type=Path, default=ROOT / "data" / "kjv.txt")
    ap.add_argument("--eval-fraction", type=float, default=0.05, help="the held-out tail of the text (as train's)")
    ap.add_argument("--streams", type=positive_int, default=32, help="held-out windows")
    ap.add_argument("--tokens", type=positive_int, default=1024, help="tokens per window, at least 2")
    ap.add_argument("--threads", type=positive_int, default=2, help="onnxruntime intra-op threads")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.tokens < 2:
        ap.error("--tokens must be at least 2 (each stream predicts its tokens after the first)")
    if not 0 < args.eval_fraction < 1:
        ap.error(f"--eval-fraction must be between 0 and 1, found {args.eval_fraction}")
    if args.json is not None and not args.json.parent.is_dir():
        ap.error(f"--json {args.json}: no such directory {args.json.parent}")

    import onnxruntime
    import torch

    from mamba_export.errors import MambaExportError
    from mamba_export.export import export_checkpoint

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:  # the text first (quick), then the three exports; a user mistake is one line
            ids = held_out_ids(args.checkpoint, args.text, args.eval_fraction, args.streams, args.tokens)
            exports = {d: export_checkpoint(args.checkpoint, Path(tmp) / d, decode_weights=d) for d in DTYPES}
        except MambaExportError as e:
            ap.exit(2, f"eval_decode_weights: error: {e}\n")
        target = ids[:, 1:]
        logp = {}
        for d in DTYPES:
            t0 = time.perf_counter()
            logp[d] = decode_logprobs(exports[d], ids, args.threads)
            seconds = time.perf_counter() - t0
            picked = np.take_along_axis(logp[d], target[..., None], axis=-1)[..., 0]
            results[d] = {"bits_per_token": float(-picked.mean() / np.log(2)), "seconds": seconds,
                          "decode_ms_per_step": seconds / (ids.shape[1] - 1) * 1e3}
    ref = logp["float32"]
    ref_picked = np.take_along_axis(ref, target[..., None], axis=-1)[..., 0]
    for d in DTYPES:
        lp = logp[d]
        picked = np.take_along_axis(lp, target[..., None], axis=-1)[..., 0]
        kl = (np.exp(ref) * (ref - lp)).sum(axis=-1).mean() / np.log(2)
        results[d] |= {
            "vs_float32_bits": results[d]["bits_per_token"] - results["float32"]["bits_per_token"],
            "top1_agreement": float((lp.argmax(-1) == ref.argmax(-1)).mean()),
            "kl_bits_per_token": float(kl),
            "max_abs_dlogp": float(np.abs(picked - ref_picked).max()),
        }
    print(f"\n{args.checkpoint.name}: {args.streams} held-out streams x {args.tokens} tokens of {args.text.name} "
          f"(last {args.eval_fraction:.0%}), teacher-forced through decode.onnx, {args.threads} threads\n")
    print("| decode weights | bits/token | vs float32 | top-1 agreement | KL (bits/token) | max abs d logp | "
          "decode ms/step (batch {}) |".format(args.streams))
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for d, r in results.items():
        print(f"| {d} | {r['bits_per_token']:.4f} | {r['vs_float32_bits']:+.4f} | {r['top1_agreement']:.4f} | "
              f"{r['kl_bits_per_token']:.2e} | {r['max_abs_dlogp']:.3g} | {r['decode_ms_per_step']:.2f} |")
    if args.json:
        report = {"settings": {k: str(v) for k, v in vars(args).items()},
                  "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                               "python": platform.python_version()},
                  "results": results}
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
