"""``mamba-export profile OUT_DIR``: latency profile of the runtime on an export (JSON, Markdown, PNG plots).

Measures, after a warm-up reported apart: time to first token and prefill tokens/s per batch and prompt length;
decode ms/step p50/p90/p99, tokens/s and achieved GB/s against the memory floor per batch; decode latency against
position over ``--position-tokens`` tokens; onnxruntime's top operators in decode.onnx; peak memory; and, with
``--compare-torch``, the PyTorch reference model on the same prompts in the same run. torch is imported only then.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

from ..errors import MambaExportError
from ..outdir import check_writable, output_path
from .generate import ort_config_entry


def _ints(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",")]
    except ValueError:  # also an empty item ("1,,2", "8,")
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, found {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, found {text!r}")
    return values


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "profile",
        help="measure latency, throughput and memory of an export with the runtime",
        description=__doc__.split("\n\n")[1].replace("\n", " ").replace("``", ""),
    )
    p.add_argument("export_dir", metavar="OUT_DIR", help="directory written by 'mamba-export export'")
    p.add_argument("--provider", choices=("cpu", "cuda"), default="cpu", help="execution provider (default cpu)")
    p.add_argument("--threads", type=int, metavar="N", help="onnxruntime intra-op threads (default: its own)")
    p.add_argument("--ort-config", type=ort_config_entry, action="append", default=[], metavar="KEY=VALUE",
                   help="an onnxruntime session config entry for both sessions, repeatable, passed through unchecked "
                        "(e.g. session.disable_prepacking=1: the weights stay memory-mapped, one copy for both)")
    p.add_argument("--batch", type=_ints, default=[1, 8, 32], metavar="1,8,32", help="batch sizes (default 1,8,32)")
    p.add_argument("--prompt-len", type=_ints, default=[128], metavar="L,...", help="prompt lengths (default 128)")
    p.add_argument("--gen-len", type=int, default=64, metavar="N", help="decode steps timed per batch (default 64)")
    p.add_argument("--position-tokens", type=int, default=10_000, metavar="N",
                   help="tokens of the latency-against-position run (default 10000)")
    p.add_argument("--repeats", type=int, default=3, metavar="N", help="prefill repeats per setting (default 3)")
    p.add_argument("--compare-torch", metavar="CHECKPOINT_DIR", help="also time the PyTorch reference model")
    p.add_argument("-o", "--output", metavar="DIR", help="where to write the files (default: profile-<OUT_DIR name>)")
    p.add_argument("--no-custom-ops", action="store_true", help="run the graphs' function fallbacks, not the library")
    p.set_defaults(run=run)


def _check(args: argparse.Namespace) -> None:
    if args.compare_torch and importlib.util.find_spec("torch") is None:
        from ..cli import install_hint

        raise MambaExportError(f"--compare-torch needs torch ({install_hint('torch', 'export')})")
    for name in ("gen_len", "position_tokens", "repeats"):
        if getattr(args, name) < 1:
            flag, value = name.replace("_", "-"), getattr(args, name)
            raise MambaExportError(f"--{flag} must be a positive integer, found {value}")
    if args.threads is not None and args.threads < 1:
        raise MambaExportError(f"--threads must be a positive integer, found {args.threads}")


def _measure_runtime(rt, args, bar) -> dict:
    from mamba_runtime import profiling as prof

    library = rt.custom_op_library is not None
    out: dict = {"warmup_s": prof.measure_warmup(rt, min(args.prompt_len))}
    out["prefill"] = [{"batch": b, "prompt_len": pl, **prof.measure_prefill(rt, b, pl, args.repeats, bar.update)}
                      for b in args.batch for pl in args.prompt_len]
    out["decode"] = [{"batch": b, **prof.measure_decode(rt, b, min(args.prompt_len), args.gen_len,
                                                        prof.decode_bytes_per_step(rt.info, b, library), bar.update)}
                     for b in args.batch]
    out["position"] = prof.latency_vs_position(rt, args.position_tokens, tick=bar.update)
    out["top_operators"] = prof.top_operators(rt, args.batch[0], min(args.gen_len, 50))
    out["peak_rss_bytes"] = prof.peak_rss_bytes()
    return out


def _measure_torch(ckpt: str, args, rt, bar) -> dict:
    """The reference model (mamba_export.model.MambaLM) on the same random prompts: prefill and step latency."""
    import torch

    from mamba_runtime import profiling as prof

    from ..checkpoint import load_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_checkpoint(ckpt)
    if model.config.real_vocab_size != rt.info.vocab_size or model.config.n_layer != rt.info.n_layer:
        raise MambaExportError(f"--compare-torch {ckpt}: not the model of this export (vocab/layers differ)")
    out: dict = {"prefill": [], "decode": []}
    with torch.no_grad():
        for b in args.batch:
            for pl in args.prompt_len:
                ids = torch.tensor(prof.random_prompts(b, pl, rt.info.vocab_size))
                model(ids)  # warm-up at the timed shape (the allocator's and oneDNN's first-call costs stay out)
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    model(ids)
                    times.append(time.perf_counter() - t0)
                    bar.update(1)
                s = prof.summary_ms(times)
                out["prefill"].append({"batch": b, "prompt_len": pl, "prefill": s,
                                       "prefill_tokens_per_s": b * pl / s["mean_ms"] * 1e3})
            logits, state = model(torch.tensor(prof.random_prompts(b, min(args.prompt_len), rt.info.vocab_size)))
            tok = logits[:, -1].argmax(-1)
            times = []
            for _ in range(args.gen_len):
                t0 = time.perf_counter()
                logits, state = model.step(tok, state)
                tok = logits.argmax(-1)
                times.append(time.perf_counter() - t0)
                bar.update(1)
            s = prof.summary_ms(times)
            out["decode"].append({"batch": b, "decode": s, "tokens_per_s": b / s["mean_ms"] * 1e3})
    return out


def _bandwidth(provider: str, threads: int | None) -> tuple[float, str]:
    """The bandwidth of the decode floor and what it measured: the GPU's copy bandwidth on CUDA (the host's read
    bandwidth, said so, if that measurement fails), else the host's read bandwidth."""
    from mamba_runtime import profiling as prof

    source = "host memory read bandwidth"
    if provider == "cuda":
        try:
            return prof.device_bandwidth_gbs(), "GPU copy bandwidth (read + write)"
        except Exception as e:  # noqa: BLE001 - the profile stands without the GPU figure; the report says which
            source += f" (GPU measurement failed: {type(e).__name__})"
    return prof.read_bandwidth_gbs(threads or os.cpu_count() or 1), source


def _placement(report: dict) -> list[str]:
    """Under a GPU provider: which compute nodes onnxruntime placed on the CPU, per graph."""
    if report["settings"]["provider"] == "cpu":
        return []
    parts = []
    for graph, nodes in report.get("cpu_placed_nodes", {}).items():
        if nodes is None:
            parts.append(f"{graph} not reported by this onnxruntime")
        else:
            parts.append(f"{graph} " + (", ".join(f"{op} {name}" for op, name in nodes) if nodes else "none"))
    return ["compute nodes on the CPU: " + "; ".join(parts)] if parts else []


def _decode_weight_dtype(report: dict) -> str:
    """The dtype of the decode step's big matrices as the floor counts them: the narrow copies (float16, int8) that the
    library multiplies, else the export's own dtype (manifest.json's decode_weight_dtype says "float32" for a float16
    export without narrow copies: no copies, the matrices are the export's)."""
    narrow = report["settings"].get("decode_weight_dtype")
    return narrow if narrow in ("float16", "int8") and report["custom_op_library"] else report["settings"]["dtype"]


def markdown(report: dict) -> str:
    """The report's tables in Markdown."""
    rt, floor = report["runtime"], report["decode_floor_ms"]
    floors = {d["batch"]: d["floor_ms"] for d in rt["decode"]}
    lines = [f"# Profile of {report['export_dir']}", "",
             f"{report['machine']['cpu']} (load average {report['machine']['load_average_1m']:.1f} at the end), "
             f"{report['settings']['threads'] or 'default'} threads, provider "
             f"{report['settings']['provider']}, custom ops: {report['custom_op_library'] or 'function fallback'}; "
             f"warm-up {rt['warmup_s'] * 1e3:.0f} ms (not counted); peak RSS {rt['peak_rss_bytes'] / 2**20:.0f} MiB",
             f"weights read per step {report['weight_bytes_per_token'] / 1e6:.1f} MB "
             f"(decode weights {_decode_weight_dtype(report)}), "
             f"and per sequence {report['sequence_bytes_per_step'] / 1e6:.2f} MB (its state read and written, its "
             f"logits, its embedding row); {report.get('bandwidth_source', 'host memory read bandwidth')} "
             f"{report['read_bandwidth_GBps']:.1f} GB/s -> decode floor {floor:.3f} ms/step at batch 1",
             *_placement(report), "",
             "| implementation | batch | prompt tokens | TTFT p50 ms | prefill tok/s |",
             "| --- | --- | --- | --- | --- |"]
    impls = [("runtime", rt)] + ([("PyTorch reference", report["torch"])] if report.get("torch") else [])
    for name, r in impls:
        for p in r["prefill"]:
            ttft = f"{p['ttft']['p50_ms']:.2f}" if "ttft" in p else "-"
            lines.append(f"| {name} | {p['batch']} | {p['prompt_len']} | {ttft} | {p['prefill_tokens_per_s']:.0f} |")
    lines += ["", "| implementation | batch | decode ms/step p50 | p90 | p99 | mean | tokens/s | GB/s | floor ms "
              "| x floor |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in impls:
        for d in r["decode"]:
            s = d["decode"]
            gbs = f"{d['achieved_GBps']:.1f}" if "achieved_GBps" in d else "-"
            lines.append(f"| {name} | {d['batch']} | {s['p50_ms']:.3f} | {s['p90_ms']:.3f} | {s['p99_ms']:.3f} | "
                         f"{s['mean_ms']:.3f} | {d['tokens_per_s']:.0f} | {gbs} | {floors[d['batch']]:.3f} | "
                         f"{s['p50_ms'] / floors[d['batch']]:.2f} |")
    lines += ["", "tokens/s and prefill tok/s are throughput (from the mean time, slow steps included); GB/s and "
              "x floor are from the p50 step; the floor is the step's bytes (the weights once, each sequence's state "
              "read and written and its logits) over the bandwidth."]
    if any(d["decode"]["p50_ms"] < d["floor_ms"] for d in rt["decode"]):
        lines += ["x floor below 1: the weights come from the CPU's caches rather than memory (the model is small "
                  "enough), so the memory floor does not bound this step."]
    pos = rt["position"]
    lines += ["", f"Decode latency against position ({pos['tokens']} tokens, batch 1): last window / first window = "
              f"{pos['last_over_first']:.2f}", "", "| from position (tokens) | p50 ms | p90 ms |",
              "| --- | --- | --- |"]
    lines += [f"| {w['position']} | {w['p50_ms']:.3f} | {w['p90_ms']:.3f} |" for w in pos["windows"]]
    top = rt["top_operators"]
    lines += ["", f"Top operators of decode.onnx (onnxruntime profiler, batch {report['settings']['batch'][0]}, "
              f"median over {top['steps']} steps after {top['warmup_steps']} warm-up steps; the profiled step's "
              f"median is {top['step_ms']:.3f} ms, slower than unprofiled for the per-node timing; share is of the "
              f"nodes' summed time, {top['kernel_ms']:.3f} ms)", "",
              "| op | ms/step | share | calls/step |", "| --- | --- | --- | --- |"]
    lines += [f"| {o['op']} | {o['ms_per_step']:.3f} | {o['share']:.0%} | {o['calls_per_step']} |"
              for o in top["ops"]]
    return "\n".join(lines) + "\n"


def plot(report: dict, out: Path) -> list[str]:
    """latency_vs_position.png and latency_vs_batch.png; returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pos = report["runtime"]["position"]["windows"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([w["position"] for w in pos], [w["p50_ms"] for w in pos], marker="o", label="p50")
    ax.plot([w["position"] for w in pos], [w["p90_ms"] for w in pos], marker=".", label="p90")
    ax.axhline(report["decode_floor_ms"], color="gray", linestyle="--", label="memory floor")
    ax.set(xlabel="position (tokens generated)", ylabel="decode ms/step", ylim=(0, None),
           title="Decode latency against position (batch 1)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "latency_vs_position.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    impls = [("runtime", report["runtime"])] + ([("PyTorch reference", report["torch"])] if report.get("torch") else [])
    for name, r in impls:
        ax.plot([d["batch"] for d in r["decode"]], [d["decode"]["p50_ms"] for d in r["decode"]], marker="o", label=name)
    decode = report["runtime"]["decode"]
    ax.plot([d["batch"] for d in decode], [d["floor_ms"] for d in decode], color="gray", linestyle="--",
            label="memory floor")
    ax.set(xlabel="batch", ylabel="decode ms/step (p50)", xscale="log", ylim=(0, None),
           title="Decode latency against batch")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "latency_vs_batch.png", dpi=100)
    plt.close(fig)
    return ["latency_vs_position.png", "latency_vs_batch.png"]


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from mamba_runtime import MambaRuntime
    from mamba_runtime import profiling as prof

    _check(args)
    if args.compare_torch:  # a bad checkpoint fails now, not after the runtime's minutes of measurements
        from ..checkpoint import read_config

        read_config(args.compare_torch)
    rt = MambaRuntime(args.export_dir, provider=args.provider, threads=args.threads,
                      custom_ops="off" if args.no_custom_ops else "auto", ort_config=dict(args.ort_config),
                      max_batch=max(256, *args.batch))
    out = output_path(args.output if args.output is not None else f"profile-{rt.info.path.name}")
    if out.exists() and not out.is_dir():
        raise MambaExportError(f"{out}: exists and is not a directory")
    check_writable(out, inside=True)  # before the measurements, which take minutes; the files are written after
    library = rt.custom_op_library is not None
    wbytes = prof.weight_bytes_per_token(rt.info, library=library)
    n_prefill = len(args.batch) * len(args.prompt_len) * args.repeats
    total = n_prefill + len(args.batch) * args.gen_len + args.position_tokens
    if args.compare_torch:
        total += n_prefill + len(args.batch) * args.gen_len
    with tqdm(total=total, desc="profile", unit="step", file=sys.stderr, leave=False) as bar:
        measured = _measure_runtime(rt, args, bar)  # first: peak RSS is the runtime's alone
        bw, bw_source = _bandwidth(rt.device.name, args.threads)
        for d in measured["decode"]:
            d["floor_ms"] = d["bytes_per_step"] / bw / 1e6
        report = {
            "export_dir": str(rt.info.path), "machine": prof.machine_info(), "settings": {
                "provider": rt.device.name, "threads": args.threads, "batch": args.batch,
                "prompt_len": args.prompt_len, "gen_len": args.gen_len, "position_tokens": args.position_tokens,
                "repeats": args.repeats, "dtype": rt.info.dtype,
                "decode_weight_dtype": rt.info.manifest.get("decode_weight_dtype")},
            "custom_op_library": rt.custom_op_library, "weight_bytes_per_token": wbytes,
            "sequence_bytes_per_step": prof.sequence_bytes_per_step(rt.info),
            "read_bandwidth_GBps": bw, "bandwidth_source": bw_source,
            "decode_floor_ms": prof.decode_bytes_per_step(rt.info, 1, library) / bw / 1e6, "runtime": measured,
            "cpu_placed_nodes": rt.cpu_nodes,
        }
        if args.compare_torch:
            report["torch"] = _measure_torch(args.compare_torch, args, rt, bar)
            report["machine"]["versions"]["torch"] = sys.modules["torch"].__version__
    table = markdown(report)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "profile.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "profile.md").write_text(table)
        if importlib.util.find_spec("matplotlib") is None:
            pngs = []
            print("mamba-export profile: note: no plots (matplotlib is not installed: pip install matplotlib)",
                  file=sys.stderr)
        else:
            pngs = plot(report, out)
    except OSError as e:
        raise MambaExportError(f"{out}: cannot write the profile ({e.strerror or e})") from None
    print(table)
    print(f"wrote {out / 'profile.json'}, {out / 'profile.md'}" + "".join(f", {out / p}" for p in pngs))
    return 0
