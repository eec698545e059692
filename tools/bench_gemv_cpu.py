#!/usr/bin/env python3
"""Is the CPU decode step at the memory floor? Times the 49 matrix-vector products of one mamba-130m decode token
(24 x in_proj 768x3072, 24 x out_proj 1536x768, the 768x50280 LM head; float32, 494 MB, weights far larger than the
caches) four ways in one run, interleaved in rounds:

    onnxruntime: the 49 MatMul nodes in one graph, 2 intra-op threads (as decode.onnx runs them);
    LinearF16W:  the same products as 49 LinearF16W nodes of our library with float16 weights (247 MB; what
                 decode.onnx runs with --decode-weights float16), 2 intra-op threads;
    LinearI8W:   the same as 49 LinearI8W nodes with int8 weights and float32 row scales (124 MB; what decode.onnx
                 runs with --decode-weights int8), 2 intra-op threads;
    OpenBLAS:    numpy's x @ W over the float32 matrices (set OPENBLAS_NUM_THREADS=2);
    read floor:  numpy summing two halves of as many bytes as the float32 matrices on two threads (the memory read
                 bandwidth).

Prints medians and p10-p90 of ms per token and the GB/s they mean (each over its own bytes). --batch B multiplies B
rows of x instead of one. --baseline-library PATH adds the LinearF16W and LinearI8W rows of another build of the
library (say, of the previous commit: an A/B of a kernel change in the same rounds). Usage:

    OPENBLAS_NUM_THREADS=2 .venv/bin/python tools/bench_gemv_cpu.py [--rounds 5] [--reps 10] [--batch 1]
        [--baseline-library PATH]
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from tool_args import parser as tool_parser, positive_int

SHAPES = [(768, 3072), (1536, 768)] * 24 + [(768, 50280)]


def ort_session(weights: list[np.ndarray], batch: int, library: str | None = None) -> ort.InferenceSession:
    """MatMul nodes over float32 weights [K, N]; with ``library``, LinearF16W nodes over float16 weights [N, K], or
    LinearI8W nodes over int8 weights [N, K] (with a scale of 1/127 a row)."""
    nodes, inits, outs = [], [], []
    for i, w in enumerate(weights):
        k, n = w.shape if library is None else w.shape[::-1]
        inits.append(numpy_helper.from_array(w, f"W{i}"))
        if library is None:
            nodes.append(helper.make_node("MatMul", [f"x{k}", f"W{i}"], [f"y{i}"]))
        elif w.dtype == np.int8:
            inits.append(numpy_helper.from_array(np.full(n, 1 / 127, np.float32), f"S{i}"))
            nodes.append(helper.make_node("LinearI8W", [f"x{k}", f"W{i}", f"S{i}"], [f"y{i}"],
                                          domain="ai.mamba_export"))
        else:
            nodes.append(helper.make_node("LinearF16W", [f"x{k}", f"W{i}"], [f"y{i}"], domain="ai.mamba_export"))
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [batch, n]))
    inputs = [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [batch, k]) for k in (768, 1536)]
    model = helper.make_model(helper.make_graph(nodes, "gemvs", inputs, outs, inits),
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("ai.mamba_export", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    if library is not None:
        so.register_custom_ops_library(library)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def two_thread_sum(halves: list[np.ndarray]) -> None:
    workers = [threading.Thread(target=np.add.reduce, args=(h,)) for h in halves]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def main() -> None:
    ap = tool_parser(__doc__)
    ap.add_argument("--rounds", type=positive_int, default=5)
    ap.add_argument("--reps", type=positive_int, default=10, help="timed tokens per implementation and round")
    ap.add_argument("--batch", type=positive_int, default=1, help="rows of x per product")
    ap.add_argument("--baseline-library", help="another build of libmamba_export_ops.so to time beside this one")
    args = ap.parse_args()
    if args.baseline_library and not Path(args.baseline_library).is_file():
        ap.error(f"--baseline-library {args.baseline_library}: no such file")
    from mamba_runtime import custom_op_library_path

    rng = np.random.default_rng(0)
    weights = [rng.standard_normal(s, dtype=np.float32) * 0.02 for s in SHAPES]
    halves16 = [np.ascontiguousarray(w.T).astype(np.float16) for w in weights]  # [N, K]: each output's row
    quarters8 = [rng.integers(-127, 128, w.shape[::-1], dtype=np.int8) for w in weights]
    nbytes = sum(w.nbytes for w in weights)
    x = {k: rng.standard_normal((args.batch, k), dtype=np.float32) for k in (768, 1536)}
    feeds = {"x768": x[768], "x1536": x[1536]}
    session = ort_session(weights, args.batch)
    session16 = ort_session(halves16, args.batch, custom_op_library_path())
    session8 = ort_session(quarters8, args.batch, custom_op_library_path())
    flat = np.ones(nbytes // 8)
    halves = np.array_split(flat, 2)
    impls = {
        "onnxruntime MatMul": lambda: session.run(None, feeds),
        "onnxruntime LinearF16W (float16 weights)": lambda: session16.run(None, feeds),
        "onnxruntime LinearI8W (int8 weights)": lambda: session8.run(None, feeds),
        "OpenBLAS (numpy)": lambda: [x[w.shape[0]] @ w for w in weights],
        "read floor (numpy sum)": lambda: two_thread_sum(halves),
    }
    impl_bytes = {name: nbytes for name in impls} | {"onnxruntime LinearF16W (float16 weights)": nbytes // 2,
                                                     "onnxruntime LinearI8W (int8 weights)": nbytes // 4}
    if args.baseline_library:
        base16 = ort_session(halves16, args.batch, args.baseline_library)
        base8 = ort_session(quarters8, args.batch, args.baseline_library)
        impls["baseline library: LinearF16W"] = lambda: base16.run(None, feeds)
        impls["baseline library: LinearI8W"] = lambda: base8.run(None, feeds)
        impl_bytes |= {"baseline library: LinearF16W": nbytes // 2, "baseline library: LinearI8W": nbytes // 4}
    times: dict[str, list[float]] = {k: [] for k in impls}
    for fn in impls.values():
        fn()  # warm-up
    for _ in range(args.rounds):
        for name, fn in impls.items():
            for _ in range(args.reps):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    print(f"{nbytes / 1e6:.0f} MB per token (float32), batch {args.batch}; "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}; "
          f"load average {os.getloadavg()[0]:.2f}; onnxruntime {ort.__version__}, numpy {np.__version__}")
    print("| implementation | ms/token median (p10-p90) | GB/s at the median |\n| --- | --- | --- |")
    for name, ts in times.items():
        ms = np.asarray(ts) * 1e3
        med = float(np.median(ms))
        print(f"| {name} | {med:.2f} ({np.percentile(ms, 10):.2f}-{np.percentile(ms, 90):.2f}) | "
              f"{impl_bytes[name] / med / 1e6:.1f} |")


if __name__ == "__main__":
    main()
