"""Time the CPU custom ops in onnxruntime on mamba-130m shapes: SelectiveScan, CausalConv1d (prefill), DecodeStep.

    .venv/bin/python custom_ops/bench/bench_cpu_ops.py [--threads 2] [--repeats 50]

Each op runs as a single-node model (the test file's builder) on random inputs; the first run is reported apart as
warm-up, then the median and p90 wall-clock time of the timed runs, and the median CPU time of the process per run
(all threads): on a machine shared with other work the wall-clock numbers wander, the CPU time much less. For
context it also times the plain-PyTorch reference scan (float32, torch's threads set to the same count).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
import test_custom_ops_cpu as t  # noqa: E402  (model builders, inputs and references of the tests)


def timed(fn, repeats: int, warmup: int = 3) -> tuple[float, float, float, float]:
    """(first-call seconds, median, p90, median process CPU seconds) of fn()."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        fn()
    times, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return first, float(np.median(times)), float(np.percentile(times, 90)), float(np.median(cpu))


def session(op: str, dtype, threads: int, **attrs) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.register_custom_ops_library(t.custom_op_library_path())
    options.intra_op_num_threads = threads
    return ort.InferenceSession(t.single_node_model(op, dtype, attrs).SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def report(name: str, result: tuple[float, float, float, float], work: str = "") -> None:
    first, median, p90, cpu = result
    print(f"{name:46s} warm-up {first * 1e3:8.3f} ms  median {median * 1e3:8.3f} ms  p90 {p90 * 1e3:8.3f} ms  "
          f"CPU {cpu * 1e3:8.3f} ms  {work}")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"onnxruntime {ort.__version__}, torch {torch.__version__}, {cpu_name()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}, intra-op threads {args.threads}")

    b, l, e, n = 1, 512, 1536, 16
    for dtype in (np.float32, np.float16):
        feeds = t.scan_feeds(0, dtype, b, l, e, n, softplus=True)
        sess = session("SelectiveScan", dtype, args.threads, delta_softplus=1)
        result = timed(lambda: sess.run(None, feeds), args.repeats)
        exps = b * l * e * n
        report(f"SelectiveScan b={b} l={l} e={e} n={n} {dtype.__name__}", result,
               f"{exps / result[1] / 1e9:.2f} G state updates/s")
    feeds = t.scan_feeds(0, np.float32, b, l, e, n, softplus=True)
    report("  reference: selective_scan_ref, torch float32",
           timed(lambda: t.scan_reference(feeds, True), 5, warmup=1))

    b, l, e, k = 1, 512, 1536, 4
    feeds = t.conv_feeds(0, np.float32, b, l, e, k)
    sess = session("CausalConv1d", np.float32, args.threads, silu=1)
    report(f"CausalConv1d b={b} l={l} e={e} k={k} float32", timed(lambda: sess.run(None, feeds), args.repeats))

    b, e, n, k, r = 1, 1536, 16, 4, 48
    for dtype in (np.float32, np.float16):
        feeds = t.decode_feeds(0, dtype, b, e, n, k, r)
        sess = session("DecodeStep", dtype, args.threads)
        weights = sum(v.nbytes for key, v in feeds.items() if key not in ("xz", "conv_state_in", "ssm_state_in"))
        result = timed(lambda: sess.run(None, feeds), args.repeats * 20)
        report(f"DecodeStep b={b} e={e} n={n} k={k} r={r} {dtype.__name__}", result,
               f"{weights / result[1] / 1e9:.2f} GB/s of parameters")


if __name__ == "__main__":
    main()
