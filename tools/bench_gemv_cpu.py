#!/usr/bin/env python3
"""Is the CPU decode step at the memory floor? Times the 49 matrix-vector products of one mamba-130m decode token
(24 x in_proj 768x3072, 24 x out_proj 1536x768, the 768x50280 LM head; float32, 494 MB, weights far larger than the
caches) three ways in one run, interleaved in rounds:

    onnxruntime: the 49 MatMul nodes in one graph, 2 intra-op threads (as decode.onnx runs them);
    OpenBLAS:    numpy's x @ W over the same matrices (set OPENBLAS_NUM_THREADS=2);
    read floor:  numpy summing two halves of as many bytes on two threads (the memory read bandwidth).

Prints medians and p10-p90 of ms per token and the GB/s they mean. Usage:

    OPENBLAS_NUM_THREADS=2 .venv/bin/python tools/bench_gemv_cpu.py [--rounds 5] [--reps 10]
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

SHAPES = [(768, 3072), (1536, 768)] * 24 + [(768, 50280)]


def ort_session(weights: list[np.ndarray]) -> ort.InferenceSession:
    nodes, inits, outs = [], [], []
    for i, w in enumerate(weights):
        inits.append(numpy_helper.from_array(w, f"W{i}"))
        nodes.append(helper.make_node("MatMul", [f"x{w.shape[0]}", f"W{i}"], [f"y{i}"]))
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, w.shape[1]]))
    inputs = [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [1, k]) for k in (768, 1536)]
    model = helper.make_model(helper.make_graph(nodes, "gemvs", inputs, outs, inits),
                              opset_imports=[helper.make_opsetid("", 18)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def two_thread_sum(halves: list[np.ndarray]) -> None:
    workers = [threading.Thread(target=np.add.reduce, args=(h,)) for h in halves]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=10, help="timed tokens per implementation and round")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal(s, dtype=np.float32) * 0.02 for s in SHAPES]
    nbytes = sum(w.nbytes for w in weights)
    x = {k: rng.standard_normal((1, k), dtype=np.float32) for k in (768, 1536)}
    session, feeds = ort_session(weights), {"x768": x[768], "x1536": x[1536]}
    flat = np.ones(nbytes // 8)
    halves = np.array_split(flat, 2)
    impls = {
        "onnxruntime MatMul": lambda: session.run(None, feeds),
        "OpenBLAS (numpy)": lambda: [x[w.shape[0]] @ w for w in weights],
        "read floor (numpy sum)": lambda: two_thread_sum(halves),
    }
    times: dict[str, list[float]] = {k: [] for k in impls}
    for fn in impls.values():
        fn()  # warm-up
    for _ in range(args.rounds):
        for name, fn in impls.items():
            for _ in range(args.reps):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    print(f"{nbytes / 1e6:.0f} MB per token; OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}; "
          f"load average {os.getloadavg()[0]:.2f}; onnxruntime {ort.__version__}, numpy {np.__version__}")
    print("| implementation | ms/token median (p10-p90) | GB/s at the median |\n| --- | --- | --- |")
    for name, ts in times.items():
        ms = np.asarray(ts) * 1e3
        med = float(np.median(ms))
        print(f"| {name} | {med:.2f} ({np.percentile(ms, 10):.2f}-{np.percentile(ms, 90):.2f}) | "
              f"{nbytes / med / 1e6:.1f} |")


if __name__ == "__main__":
    main()
