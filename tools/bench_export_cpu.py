#!/usr/bin/env python3
"""CPU benchmark of the exported graphs (issue 3's speed section), all measured in one run.

For the mamba-130m shape (d_model 768, 24 layers, vocab 50280; random weights from its config), batch 1, with
``--threads`` intra-op threads (default 2), it measures:

    decode ms/token:  onnxruntime + our library (decode.onnx), onnxruntime without it (model-local function fallback),
                      the PyTorch reference (MambaLM.step), transformers' generation loop with its cache;
    prefill tok/s:    the same four on a ``--prompt-len`` prompt (onnxruntime uses the last-position-only graph,
                      transformers its forward);
    floor:            bytes of weights read per decoded token / this machine's measured memory read bandwidth.

Prints a Markdown table (median, p10-p90 spread, ratio to the floor and to transformers) and writes JSON with the
machine, versions and settings. Usage:

    .venv/bin/python tools/bench_export_cpu.py [--threads 2] [--decode-steps 64] [--prompt-len 512] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def _percentile(xs, q):
    return float(np.percentile(np.asarray(xs), q))


def summary(samples_s: list[float]) -> dict:
    """Median and p10/p90 of a list of seconds, in milliseconds."""
    ms = [s * 1e3 for s in samples_s]
    return {"median_ms": statistics.median(ms), "p10_ms": _percentile(ms, 10), "p90_ms": _percentile(ms, 90),
            "n": len(ms)}


def make_checkpoint(root: Path, args) -> tuple[Path, object]:
    """A random-weight checkpoint of the mamba-130m shape, saved in the state-spaces layout."""
    import torch

    from mamba_export.checkpoint import save_checkpoint
    from mamba_export.config import MambaConfig
    from mamba_export.model import MambaLM

    torch.manual_seed(0)
    cfg = MambaConfig(d_model=args.d_model, n_layer=args.n_layer, vocab_size=args.vocab)
    model = MambaLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.0 + 0.01 * torch.randn_like(p))
    return save_checkpoint(model, root / "ckpt"), model


def ort_session(path: Path, threads: int, library: str | None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    if library:
        so.register_custom_ops_library(library)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def zero_state_feeds(cfg, batch: int) -> dict[str, np.ndarray]:
    feeds = {}
    for i in range(cfg.n_layer):
        feeds[f"past_conv.{i}"] = np.zeros((batch, cfg.d_inner, cfg.d_conv - 1), np.float32)
        feeds[f"past_ssm.{i}"] = np.zeros((batch, cfg.d_inner, cfg.d_state), np.float32)
    return feeds


def bench_ort(out_dir: Path, cfg, prompt: np.ndarray, steps: int, threads: int, library: str | None,
              prefill_repeats: int) -> dict:
    """Prefill (last-logits graph) and decode (decode.onnx) timings of onnxruntime, with or without the library."""
    prefill_graph = out_dir / ("model_last.onnx" if (out_dir / "model_last.onnx").exists() else "model.onnx")
    pre = ort_session(prefill_graph, threads, library)
    dec = ort_session(out_dir / "decode.onnx", threads, library)
    names = [o.name for o in pre.get_outputs()]
    feeds = {"input_ids": prompt, **zero_state_feeds(cfg, 1)}
    pre.run(None, feeds)  # warm-up
    pre_times = []
    for _ in range(prefill_repeats):
        t0 = time.perf_counter()
        outs = pre.run(None, feeds)
        pre_times.append(time.perf_counter() - t0)
    state = {n.replace("present_", "past_"): v for n, v in zip(names[1:], outs[1:])}
    tok = np.array([[int(outs[0][0, -1].argmax())]], dtype=np.int64)
    dec_names = [o.name for o in dec.get_outputs()]
    for _ in range(3):  # warm-up, state not advanced
        dec.run(None, {"input_ids": tok, **state})
    dec_times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        outs = dec.run(None, {"input_ids": tok, **state})
        dec_times.append(time.perf_counter() - t0)
        state = {n.replace("present_", "past_"): v for n, v in zip(dec_names[1:], outs[1:])}
        tok = np.array([[int(outs[0][0, -1].argmax())]], dtype=np.int64)
    return {"prefill": summary(pre_times), "decode": summary(dec_times)}


def bench_torch_reference(model, prompt: np.ndarray, steps: int, prefill_repeats: int) -> dict:
    import torch

    ids = torch.from_numpy(prompt)
    with torch.no_grad():
        model(ids[:, :8])  # warm-up
        pre_times = []
        for _ in range(prefill_repeats):
            t0 = time.perf_counter()
            logits, state = model(ids)
            pre_times.append(time.perf_counter() - t0)
        tok = logits[:, -1].argmax(-1)
        dec_times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            logits, state = model.step(tok, state)
            dec_times.append(time.perf_counter() - t0)
            tok = logits.argmax(-1)
    return {"prefill": summary(pre_times), "decode": summary(dec_times)}


def bench_transformers(model, prompt: np.ndarray, steps: int, prefill_repeats: int, repeats: int = 3) -> dict:
    """transformers' MambaForCausalLM with the same weights: forward for prefill, generate() with cache for decode.

    Decode ms/token = (generate(prompt, N + 1 tokens) - generate(prompt, 1 token)) / N, median over ``repeats``."""
    import torch
    from transformers import MambaConfig as HFConfig
    from transformers import MambaForCausalLM

    c = model.config
    hf_cfg = HFConfig(vocab_size=c.vocab_size, hidden_size=c.d_model, state_size=c.d_state,
                      num_hidden_layers=c.n_layer, conv_kernel=c.d_conv, expand=c.expand, time_step_rank=c.dt_rank,
                      use_bias=c.bias, use_conv_bias=c.conv_bias, tie_word_embeddings=c.tie_embeddings)
    hf = MambaForCausalLM(hf_cfg).eval()
    sd = {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in model.state_dict().items()}
    hf.load_state_dict(sd, strict=False)
    ids = torch.from_numpy(prompt)
    with torch.no_grad():
        hf(input_ids=ids[:, :8], use_cache=False)
        pre_times = []
        for _ in range(prefill_repeats):
            t0 = time.perf_counter()
            hf(input_ids=ids, use_cache=False)
            pre_times.append(time.perf_counter() - t0)
        short = ids[:, :16]
        kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
        hf.generate(short, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
        per_token = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            hf.generate(short, max_new_tokens=1, min_new_tokens=1, **kw)
            t1 = time.perf_counter()
            hf.generate(short, max_new_tokens=steps + 1, min_new_tokens=steps + 1, **kw)
            t2 = time.perf_counter()
            per_token.append(((t2 - t1) - (t1 - t0)) / steps)
    return {"prefill": summary(pre_times), "decode": summary(per_token)}


def weight_bytes_per_token(model) -> int:
    """Bytes of weights a decode step must read: every parameter once, except the embedding rows not looked up
    (the tied LM head still reads the whole matrix)."""
    seen = {id(p): p for p in model.parameters()}
    total = sum(p.numel() * p.element_size() for p in seen.values())
    if not model.config.tie_embeddings:
        emb = model.backbone.embedding.weight
        total -= emb.numel() * emb.element_size() - emb.shape[1] * emb.element_size()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--prefill-repeats", type=int, default=5)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--n-layer", type=int, default=24)
    ap.add_argument("--vocab", type=int, default=50280)
    ap.add_argument("--skip", default="", help="comma list of: ort_lib, ort_nolib, torch, transformers")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()

    import onnxruntime
    import torch

    torch.set_num_threads(args.threads)
    from mamba_export.export import export_checkpoint
    from mamba_runtime import custom_op_library_path
    from mamba_runtime.profiling import read_bandwidth_gbs

    skip = set(filter(None, args.skip.split(",")))
    results: dict[str, dict] = {}
    # The read bandwidth of a shared VM moves between runs: measure it before and after the timings, and take the
    # highest as the floor's bandwidth (the conservative choice: the lowest floor).
    bandwidths = [read_bandwidth_gbs(args.threads)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt, model = make_checkpoint(root, args)
        t0 = time.perf_counter()
        out = export_checkpoint(ckpt, root / "export", last_logits=True)
        export_s = time.perf_counter() - t0
        prompt = np.random.default_rng(0).integers(0, args.vocab, (1, args.prompt_len), dtype=np.int64)
        lib = custom_op_library_path()
        if "ort_lib" not in skip:
            results["onnxruntime + library"] = bench_ort(out, model.config, prompt, args.decode_steps, args.threads,
                                                         lib, args.prefill_repeats)
        if "ort_nolib" not in skip:
            results["onnxruntime, function fallback"] = bench_ort(out, model.config, prompt, args.decode_steps,
                                                                  args.threads, None, max(1, args.prefill_repeats // 2))
        if "torch" not in skip:
            results["PyTorch reference"] = bench_torch_reference(model, prompt, args.decode_steps,
                                                                 max(1, args.prefill_repeats // 2))
        if "transformers" not in skip:
            results["transformers MambaForCausalLM"] = bench_transformers(model, prompt, args.decode_steps,
                                                                          max(1, args.prefill_repeats // 2))
        wbytes = weight_bytes_per_token(model)
    bandwidths.append(read_bandwidth_gbs(args.threads))
    bw = max(bandwidths)
    floor_ms = wbytes / (bw * 1e9) * 1e3
    base = results.get("transformers MambaForCausalLM")
    report = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                     "python": platform.python_version()},
        "settings": vars(args) | {"json": str(args.json) if args.json else None},
        "export_seconds": export_s,
        "weight_bytes_per_token": wbytes,
        "read_bandwidth_GBps": bw,
        "read_bandwidth_GBps_measured": bandwidths,
        "decode_floor_ms": floor_ms,
        "results": results,
    }
    print(f"\nmamba-{args.d_model}x{args.n_layer} shape, batch 1, {args.threads} threads; weights "
          f"{wbytes / 1e6:.0f} MB/token, read bandwidth {bw:.1f} GB/s (best of "
          f"{', '.join(f'{b:.1f}' for b in bandwidths)}) -> decode floor {floor_ms:.2f} ms/token\n")
    print("| implementation | decode ms/token (median, p10-p90) | x floor | speed-up vs transformers "
          f"| prefill {args.prompt_len} tok/s | speed-up vs transformers |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        d, p = r["decode"], r["prefill"]
        tps = args.prompt_len / (p["median_ms"] / 1e3)
        dx = f"{base['decode']['median_ms'] / d['median_ms']:.2f}x" if base else "-"
        px = f"{base['prefill']['median_ms'] / p['median_ms']:.2f}x" if base else "-"
        print(f"| {name} | {d['median_ms']:.2f} ({d['p10_ms']:.2f}-{d['p90_ms']:.2f}) | "
              f"{d['median_ms'] / floor_ms:.2f} | {dx} | {tps:.0f} | {px} |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
