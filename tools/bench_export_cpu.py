#!/usr/bin/env python3
"""CPU benchmark of the exported graphs (issue 3's speed section), all measured in one run.

For the mamba-130m shape (d_model 768, 24 layers, vocab 50280; random weights from its config), batch 1, with
``--threads`` intra-op threads (default 2), it measures:

    decode ms/token:  onnxruntime + our library (decode.onnx), the same with float16 decode weights (an export with
                      ``--decode-weights float16``: in_proj, out_proj and the LM head multiplied by LinearF16W),
                      the same with int8 decode weights (``--decode-weights int8``: LinearI8W, a scale per row),
                      the same with decode blocks (an export with ``--decode-blocks on``: one DecodeBlock per layer),
                      onnxruntime without the library (model-local function fallback), the PyTorch reference
                      (MambaLM.step), transformers' generation loop with its cache;
    prefill tok/s:    the same on a ``--prompt-len`` prompt (onnxruntime uses the last-position-only graph,
                      transformers its forward; both of our exports share the float32 prefill graph);
    floor:            bytes of weights read per decoded token / this machine's measured memory read bandwidth, for
                      the float32 decode graph and for the ones with float16 and int8 decode weights (each row's
                      "x floor" is against its own).

The implementations run interleaved in ``--rounds`` rounds (each round: every implementation's prefills, then its
``--decode-steps`` decode steps; ours, the fallback, PyTorch, transformers, then again), so that load from other jobs
on a shared machine falls on all of them alike. Each round gives every implementation a median ms/token and a
speed-up against transformers in that round; the table shows the medians over all samples, the ratio of those
medians, and the median (and range) of the per-round speed-ups, which is the steadier number when the load changes
during the run. The load average (os.getloadavg) before and after is printed and kept in the JSON.

Prints a Markdown table (median, p10-p90 spread, ratio to the floor and to transformers) and writes JSON with the
machine, versions and settings. Usage:

    .venv/bin/python tools/bench_export_cpu.py [--threads 2] [--decode-steps 64] [--prompt-len 512]
        [--prefill-repeats 4] [--rounds 4] [--skip ort_lib_f16,ort_lib_i8,...] [--json out.json]
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from tool_args import parser as tool_parser, positive_int


F16_NAME = "onnxruntime + library, float16 decode weights"
I8_NAME = "onnxruntime + library, int8 decode weights"
BLOCKS_NAME = "onnxruntime + library, decode blocks"  # --decode-blocks on: one DecodeBlock per layer


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


class OrtRunner:
    """onnxruntime, with or without the library: prefill with the last-logits graph, decode with decode.onnx."""

    def __init__(self, out_dir: Path, cfg, prompt: np.ndarray, threads: int, library: str | None):
        prefill_graph = out_dir / ("model_last.onnx" if (out_dir / "model_last.onnx").exists() else "model.onnx")
        self.pre = ort_session(prefill_graph, threads, library)
        self.dec = ort_session(out_dir / "decode.onnx", threads, library)
        self.feeds = {"input_ids": prompt, **zero_state_feeds(cfg, 1)}
        self.pre_names = [o.name for o in self.pre.get_outputs()]
        self.dec_names = [o.name for o in self.dec.get_outputs()]

    def prefill(self) -> float:
        """One timed prefill of the prompt from a zero state; the decode continues from its state and token."""
        t0 = time.perf_counter()
        outs = self.pre.run(None, self.feeds)
        elapsed = time.perf_counter() - t0
        self.state = {n.replace("present_", "past_"): v for n, v in zip(self.pre_names[1:], outs[1:])}
        self.tok = np.array([[int(outs[0][0, -1].argmax())]], dtype=np.int64)
        return elapsed

    def decode(self, steps: int) -> list[float]:
        """Seconds of each of `steps` greedy decode steps, after 3 untimed ones (state not advanced)."""
        for _ in range(3):
            self.dec.run(None, {"input_ids": self.tok, **self.state})
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            outs = self.dec.run(None, {"input_ids": self.tok, **self.state})
            times.append(time.perf_counter() - t0)
            self.state = {n.replace("present_", "past_"): v for n, v in zip(self.dec_names[1:], outs[1:])}
            self.tok = np.array([[int(outs[0][0, -1].argmax())]], dtype=np.int64)
        return times


class TorchReferenceRunner:
    """The PyTorch reference model: forward for prefill, MambaLM.step per decoded token."""

    def __init__(self, model, prompt: np.ndarray):
        import torch

        self.torch, self.model, self.ids = torch, model, torch.from_numpy(prompt)
        with torch.no_grad():
            model(self.ids[:, :8])  # warm-up

    def prefill(self) -> float:
        with self.torch.no_grad():
            t0 = time.perf_counter()
            logits, self.state = self.model(self.ids)
            elapsed = time.perf_counter() - t0
        self.tok = logits[:, -1].argmax(-1)
        return elapsed

    def decode(self, steps: int) -> list[float]:
        times = []
        with self.torch.no_grad():
            for _ in range(steps):
                t0 = time.perf_counter()
                logits, self.state = self.model.step(self.tok, self.state)
                times.append(time.perf_counter() - t0)
                self.tok = logits.argmax(-1)
        return times


class TransformersRunner:
    """transformers' MambaForCausalLM with the same weights: forward for prefill, generate() with cache for decode.

    Decode ms/token = (generate(prompt, N + 1 tokens) - generate(prompt, 1 token)) / N: one value per call of
    decode(N), with the 1-token time the mean of one call before and one after the long one."""

    def __init__(self, model, prompt: np.ndarray):
        import torch
        from transformers import MambaConfig as HFConfig
        from transformers import MambaForCausalLM

        c = model.config
        hf_cfg = HFConfig(vocab_size=c.vocab_size, hidden_size=c.d_model, state_size=c.d_state,
                          num_hidden_layers=c.n_layer, conv_kernel=c.d_conv, expand=c.expand,
                          time_step_rank=c.dt_rank, use_bias=c.bias, use_conv_bias=c.conv_bias,
                          tie_word_embeddings=c.tie_embeddings)
        self.hf = MambaForCausalLM(hf_cfg).eval()
        sd = {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in model.state_dict().items()}
        self.hf.load_state_dict(sd, strict=False)
        self.torch, self.ids = torch, torch.from_numpy(prompt)
        self.kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
        with torch.no_grad():
            self.hf(input_ids=self.ids[:, :8], use_cache=False)
            self.hf.generate(self.ids[:, :16], max_new_tokens=2, min_new_tokens=2, **self.kw)  # warm-up

    def prefill(self) -> float:
        with self.torch.no_grad():
            t0 = time.perf_counter()
            self.hf(input_ids=self.ids, use_cache=False)
            return time.perf_counter() - t0

    def decode(self, steps: int) -> list[float]:
        short = self.ids[:, :16]
        with self.torch.no_grad():
            t0 = time.perf_counter()
            self.hf.generate(short, max_new_tokens=1, min_new_tokens=1, **self.kw)
            t1 = time.perf_counter()
            self.hf.generate(short, max_new_tokens=steps + 1, min_new_tokens=steps + 1, **self.kw)
            t2 = time.perf_counter()
            self.hf.generate(short, max_new_tokens=1, min_new_tokens=1, **self.kw)
            t3 = time.perf_counter()
        return [((t2 - t1) - ((t1 - t0) + (t3 - t2)) / 2) / steps]


def run_rounds(runners: dict, rounds: int, prefills_per_round: int, steps: int) -> dict[str, dict]:
    """Interleave the runners round by round; per runner, all samples and the per-round medians (seconds)."""
    samples = {name: {"prefill": [], "decode": [], "prefill_rounds": [], "decode_rounds": []} for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            pre = [runner.prefill() for _ in range(prefills_per_round)]
            dec = runner.decode(steps)
            s = samples[name]
            s["prefill"] += pre
            s["decode"] += dec
            s["prefill_rounds"].append(statistics.median(pre))
            s["decode_rounds"].append(statistics.median(dec))
    return samples


def per_round_speedups(base: list[float], ours: list[float]) -> dict:
    """base / ours per round: median, min and max."""
    ratios = [b / o for b, o in zip(base, ours)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "rounds": ratios}


def weight_bytes_per_token(out: Path, decode_weights: str) -> int:
    """Bytes of weights a decode step of the export ``out`` reads with ``decode_weights`` in its decode.onnx:
    ``mamba-export profile``'s count (mamba_runtime.profiling), whichever of the exports were made."""
    from mamba_runtime.manifest import open_export_dir
    from mamba_runtime.profiling import weight_bytes_per_token as count

    info = open_export_dir(out, verify=False)
    return count(dataclasses.replace(info, manifest={**info.manifest, "decode_weight_dtype": decode_weights}))


SKIPPABLE = {"ort_lib", "ort_lib_f16", "ort_lib_i8", "ort_lib_blocks", "ort_nolib", "torch", "transformers"}


def main() -> None:
    ap = tool_parser(__doc__)
    ap.add_argument("--threads", type=positive_int, default=2)
    ap.add_argument("--decode-steps", type=positive_int, default=64,
                    help="timed decode steps per implementation and round")
    ap.add_argument("--prompt-len", type=positive_int, default=512)
    ap.add_argument("--prefill-repeats", type=positive_int, default=4,
                    help="timed prefills per implementation in all, spread over the rounds (at least 1 per round)")
    ap.add_argument("--rounds", type=positive_int, default=4, help="rounds of the interleaved implementations")
    ap.add_argument("--d-model", type=positive_int, default=768)
    ap.add_argument("--n-layer", type=positive_int, default=24)
    ap.add_argument("--vocab", type=positive_int, default=50280)
    ap.add_argument("--skip", default="", help=f"comma list of: {', '.join(sorted(SKIPPABLE))}")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    if skip - SKIPPABLE:
        ap.error(f"--skip: unknown {', '.join(sorted(skip - SKIPPABLE))}; choose among {', '.join(sorted(SKIPPABLE))}")
    if args.json is not None and not args.json.parent.is_dir():  # found out now, not after the whole run
        ap.error(f"--json {args.json}: no such directory {args.json.parent}")

    import onnxruntime
    import torch

    torch.set_num_threads(args.threads)
    from mamba_export.export import export_checkpoint
    from mamba_runtime import custom_op_library_path
    from mamba_runtime.profiling import read_bandwidth_gbs

    load_before = os.getloadavg()
    # The read bandwidth of a shared VM moves between runs: measure it before and after the timings, and take the
    # highest as the floor's bandwidth (the conservative choice: the lowest floor).
    bandwidths = [read_bandwidth_gbs(args.threads)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt, model = make_checkpoint(root, args)
        t0 = time.perf_counter()
        out = export_checkpoint(ckpt, root / "export", last_logits=True)
        export_s = time.perf_counter() - t0
        out16 = None
        if "ort_lib_f16" not in skip:
            out16 = export_checkpoint(ckpt, root / "export_f16", last_logits=True, decode_weights="float16")
        out8 = None
        if "ort_lib_i8" not in skip:
            out8 = export_checkpoint(ckpt, root / "export_i8", last_logits=True, decode_weights="int8")
        out_blocks = None
        if "ort_lib_blocks" not in skip:
            out_blocks = export_checkpoint(ckpt, root / "export_blocks", last_logits=True, decode_blocks="on")
        prompt = np.random.default_rng(0).integers(0, args.vocab, (1, args.prompt_len), dtype=np.int64)
        lib = custom_op_library_path()
        runners: dict[str, object] = {}
        if "ort_lib" not in skip:
            runners["onnxruntime + library"] = OrtRunner(out, model.config, prompt, args.threads, lib)
        if out16 is not None:
            runners[F16_NAME] = OrtRunner(out16, model.config, prompt, args.threads, lib)
        if out8 is not None:
            runners[I8_NAME] = OrtRunner(out8, model.config, prompt, args.threads, lib)
        if out_blocks is not None:
            runners[BLOCKS_NAME] = OrtRunner(out_blocks, model.config, prompt, args.threads, lib)
        if "ort_nolib" not in skip:
            runners["onnxruntime, function fallback"] = OrtRunner(out, model.config, prompt, args.threads, None)
        if "torch" not in skip:
            runners["PyTorch reference"] = TorchReferenceRunner(model, prompt)
        if "transformers" not in skip:
            runners["transformers MambaForCausalLM"] = TransformersRunner(model, prompt)
        for runner in runners.values():  # untimed: first-run allocations, caches
            runner.prefill()
            runner.decode(2)
        samples = run_rounds(runners, args.rounds, max(1, args.prefill_repeats // args.rounds), args.decode_steps)
        del runners
        wbytes, wbytes16, wbytes8 = (weight_bytes_per_token(out, d) for d in ("float32", "float16", "int8"))
    bandwidths.append(read_bandwidth_gbs(args.threads))
    load_after = os.getloadavg()
    bw = max(bandwidths)
    floor_ms = wbytes / (bw * 1e9) * 1e3
    floor16_ms = wbytes16 / (bw * 1e9) * 1e3
    floor8_ms = wbytes8 / (bw * 1e9) * 1e3
    row_floor = lambda name: {F16_NAME: floor16_ms, I8_NAME: floor8_ms}.get(name, floor_ms)  # noqa: E731
    base_name = "transformers MambaForCausalLM"
    base = samples.get(base_name)
    results = {}
    for name, s in samples.items():
        r = {"prefill": summary(s["prefill"]), "decode": summary(s["decode"]),
             "prefill_round_medians_ms": [v * 1e3 for v in s["prefill_rounds"]],
             "decode_round_medians_ms": [v * 1e3 for v in s["decode_rounds"]]}
        if base is not None:
            r["decode_speedup_per_round"] = per_round_speedups(base["decode_rounds"], s["decode_rounds"])
            r["prefill_speedup_per_round"] = per_round_speedups(base["prefill_rounds"], s["prefill_rounds"])
        results[name] = r
    report = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                     "python": platform.python_version()},
        "settings": vars(args) | {"json": str(args.json) if args.json else None},
        "load_average_before": load_before,
        "load_average_after": load_after,
        "export_seconds": export_s,
        "weight_bytes_per_token": wbytes,
        "read_bandwidth_GBps": bw,
        "read_bandwidth_GBps_measured": bandwidths,
        "decode_floor_ms": floor_ms,
        "weight_bytes_per_token_float16_decode_weights": wbytes16,
        "decode_floor_ms_float16_decode_weights": floor16_ms,
        "weight_bytes_per_token_int8_decode_weights": wbytes8,
        "decode_floor_ms_int8_decode_weights": floor8_ms,
        "results": results,
    }
    load = lambda la: "/".join(f"{v:.2f}" for v in la)  # noqa: E731
    print(f"\nmamba-{args.d_model}x{args.n_layer} shape, batch 1, {args.threads} threads; weights "
          f"{wbytes / 1e6:.0f} MB/token, read bandwidth {bw:.1f} GB/s (best of "
          f"{', '.join(f'{b:.1f}' for b in bandwidths)}) -> decode floor {floor_ms:.2f} ms/token; float16 decode "
          f"weights {wbytes16 / 1e6:.0f} MB/token -> floor {floor16_ms:.2f} ms/token; int8 decode weights "
          f"{wbytes8 / 1e6:.0f} MB/token -> floor {floor8_ms:.2f} ms/token")
    print(f"{args.rounds} interleaved rounds x {args.decode_steps} decode steps; load average (1/5/15 min) before "
          f"{load(load_before)}, after {load(load_after)}\n")
    print("| implementation | decode ms/token (median, p10-p90) | x floor | speed-up vs transformers: ratio of medians "
          "/ median of per-round ratios (min-max) | prefill {} tok/s | prefill speed-up: ratio of medians / "
          "median per round |".format(args.prompt_len))
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        d, p = r["decode"], r["prefill"]
        tps = args.prompt_len / (p["median_ms"] / 1e3)
        if base is not None:
            dr, pr = r["decode_speedup_per_round"], r["prefill_speedup_per_round"]
            dx = (f"{results[base_name]['decode']['median_ms'] / d['median_ms']:.2f}x / {dr['median']:.2f}x "
                  f"({dr['min']:.2f}-{dr['max']:.2f})")
            px = f"{results[base_name]['prefill']['median_ms'] / p['median_ms']:.2f}x / {pr['median']:.2f}x"
        else:
            dx = px = "-"
        print(f"| {name} | {d['median_ms']:.2f} ({d['p10_ms']:.2f}-{d['p90_ms']:.2f}) | "
              f"{d['median_ms'] / row_floor(name):.2f} | {dx} | {tps:.0f} | {px} |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
