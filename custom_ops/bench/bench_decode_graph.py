"""Time one decode step of an exported model's decode.onnx, per op kind (onnxruntime's profiler) and end to end.

    .venv/bin/python custom_ops/bench/bench_decode_graph.py EXPORT_DIR [EXPORT_DIR ...] [--library LIB ...]
        [--threads 2] [--steps 200] [--rounds 3] [--no-profile]

EXPORT_DIR is an export folder (decode.onnx + weights.bin); several compare exports of the same model written by
different versions of the exporter (each with its own library copy unless --library is given). Each --library is a
build of libmamba_export_ops.so to time (default: each folder's own copy). Every (export, library) case runs in
every round, the cases interleaved so that a shared machine's load falls on all of them alike. Per case and round: a
profiled session (unless --no-profile) gives the median per-step time of each op type (sum over its nodes,
microseconds) and per DecodeStep call; an unprofiled session gives the median ms/step of session.run. At the end:
per case the median over rounds, the graph's node count, and the median over rounds of its ms/step relative to the
first case in the same round. States are fed back step to step, batch 1, the same token every step.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort


def make_session(export: Path, library: str, threads: int, profile: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.register_custom_ops_library(library)
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "decode")
    return ort.InferenceSession(str(export / "decode.onnx"), options, providers=["CPUExecutionProvider"])


def feeds0(session: ort.InferenceSession) -> dict:
    feeds = {}
    for i in session.get_inputs():
        shape = [1 if not isinstance(d, int) else d for d in i.shape]
        if i.type == "tensor(int64)":
            feeds[i.name] = np.full(shape, 7, dtype=np.int64)
        else:
            feeds[i.name] = (np.random.default_rng(0).standard_normal(shape) * 0.1).astype(np.float32)
    return feeds


def run_steps(session: ort.InferenceSession, steps: int) -> list[float]:
    feeds = feeds0(session)
    outs = [o.name for o in session.get_outputs()]
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        result = session.run(outs, feeds)
        times.append(time.perf_counter() - start)
        for name, value in zip(outs, result):
            if name.startswith("present_"):
                feeds["past_" + name[len("present_"):]] = value
    return times


def profile_round(export: Path, library: str, threads: int, steps: int) -> tuple[dict, float]:
    """Median per-step microseconds per op type, and DecodeStep median microseconds per call."""
    session = make_session(export, library, threads, profile=True)
    run_steps(session, 10)  # warm-up (also profiled; dropped below by run index)
    run_steps(session, steps)
    trace = json.loads(Path(session.end_profiling()).read_text())
    per_run: dict = collections.defaultdict(lambda: collections.defaultdict(float))
    decode_calls, run_index = [], -1
    for event in trace:
        if event.get("cat") == "Session" and event.get("name") == "model_run":
            run_index += 1  # model_run events close after their nodes; count them to split runs
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        op = event["args"].get("op_name", "?")
        per_run[run_index + 1][op] += event["dur"]
        if op == "DecodeStep" and run_index + 1 >= 10:
            decode_calls.append(event["dur"])
    ops = collections.defaultdict(list)
    for index, by_op in per_run.items():
        if index >= 10:
            for op, us in by_op.items():
                ops[op].append(us)
    return {op: float(np.median(v)) for op, v in ops.items()}, float(np.median(decode_calls))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", type=Path, nargs="+")
    parser.add_argument("--library", action="append", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-profile", action="store_true", help="time only (no profiled session per round)")
    args = parser.parse_args()
    cases = [(export, library) for export in args.export
             for library in (args.library or [str(export / "libmamba_export_ops.so")])]
    name = lambda case: f"{case[0]} + {case[1]}"  # noqa: E731
    print(f"onnxruntime {ort.__version__}, {args.threads} intra-op threads, {os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.2f}")
    sessions = {case: make_session(case[0], case[1], args.threads, profile=False) for case in cases}
    results = collections.defaultdict(list)
    for round_ in range(args.rounds):
        for case in cases:
            export, library = case
            ops, per_call = profile_round(export, library, args.threads, args.steps) if not args.no_profile else ({}, 0)
            session = sessions[case]
            run_steps(session, 20)
            step_ms = float(np.median(run_steps(session, args.steps))) * 1e3
            results[case].append((ops, per_call, step_ms))
            top = ", ".join(f"{op} {us / 1e3:.2f}" for op, us in sorted(ops.items(), key=lambda kv: -kv[1])[:6])
            print(f"round {round_} {name(case)}: {step_ms:.2f} ms/step; DecodeStep {per_call:.1f} us/call; "
                  f"ms/step by op: {top}", flush=True)
    print(f"medians over rounds (load {os.getloadavg()[0]:.2f}):")
    first = results[cases[0]]
    for case, rows in results.items():
        nodes = len(onnx_nodes(case[0] / "decode.onnx"))
        ratio = np.median([r[2] / f[2] for r, f in zip(rows, first)])
        print(f"  {name(case)}: {np.median([r[2] for r in rows]):.2f} ms/step ({ratio:.3f}x the first case, median "
              f"of per-round ratios), {nodes} nodes, DecodeStep {np.median([r[1] for r in rows]):.1f} us/call, "
              f"{np.median([r[0].get('DecodeStep', 0) for r in rows]) / 1e3:.2f} ms/step in DecodeStep")


def onnx_nodes(path: Path) -> list:
    import onnx

    return list(onnx.load(str(path), load_external_data=False).graph.node)


if __name__ == "__main__":
    main()
