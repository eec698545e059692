#!/usr/bin/env python3
"""Time the CPU SelectiveScan op (the prefill scan of model.onnx) of this build of the custom-op library, and of
another build in the same rounds (an A/B of a kernel change). One node, delta_softplus=1, random float32 inputs in
a trained model's ranges, onnxruntime's CPU provider; prints the median and min of each build's time per call (wall
or CPU time: --clock process is less disturbed by other work on the machine) and whether the outputs are identical.

    .venv/bin/python tools/bench_scan_cpu.py [--baseline-library PATH] [--batch 1] [--length 512] [--channels 1536]
        [--state 16] [--threads 1] [--rounds 15] [--clock wall|process]
"""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper
from tool_args import parser as tool_parser, positive_int


def scan_model(b: int, l: int, e: int, n: int) -> bytes:
    shapes = [("u", [b, l, e]), ("delta", [b, l, e]), ("A", [e, n]), ("B", [b, l, n]), ("C", [b, l, n]), ("D", [e]),
              ("z", [b, l, e]), ("delta_bias", [e]), ("ssm_state_in", [b, e, n])]
    node = helper.make_node("SelectiveScan", [name for name, _ in shapes], ["y", "ssm_state_out"],
                            domain="ai.mamba_export", delta_softplus=1)
    graph = helper.make_graph(
        [node], "scan", [helper.make_tensor_value_info(name, TensorProto.FLOAT, s) for name, s in shapes],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [b, l, e]),
         helper.make_tensor_value_info("ssm_state_out", TensorProto.FLOAT, [b, e, n])])
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("ai.mamba_export", 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def main() -> None:
    ap = tool_parser(__doc__)
    ap.add_argument("--baseline-library", help="another build of libmamba_export_ops.so to time beside this one")
    ap.add_argument("--batch", type=positive_int, default=1)
    ap.add_argument("--length", type=positive_int, default=512, help="tokens")
    ap.add_argument("--channels", type=positive_int, default=1536, help="d_inner")
    ap.add_argument("--state", type=positive_int, default=16, help="d_state")
    ap.add_argument("--threads", type=positive_int, default=1, help="intra-op threads")
    ap.add_argument("--rounds", type=positive_int, default=15, help="timed calls per build")
    ap.add_argument("--clock", choices=("wall", "process"), default="wall",
                    help="wall time, or the process's CPU time")
    args = ap.parse_args()
    from mamba_runtime import custom_op_library_path

    b, l, e, n = args.batch, args.length, args.channels, args.state
    rng = np.random.default_rng(0)
    feeds = dict(u=rng.standard_normal((b, l, e), np.float32), delta=rng.standard_normal((b, l, e), np.float32) - 2,
                 A=-np.exp(rng.uniform(-1, 2.8, (e, n))).astype(np.float32),
                 B=rng.standard_normal((b, l, n), np.float32), C=rng.standard_normal((b, l, n), np.float32),
                 D=np.ones(e, np.float32), z=rng.standard_normal((b, l, e), np.float32),
                 delta_bias=np.zeros(e, np.float32), ssm_state_in=np.zeros((b, e, n), np.float32))
    libraries = {"this build": custom_op_library_path()}
    if args.baseline_library:
        libraries["baseline"] = args.baseline_library
    sessions = {}
    for name, path in libraries.items():
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.register_custom_ops_library(path)
        sessions[name] = ort.InferenceSession(scan_model(b, l, e, n), so, providers=["CPUExecutionProvider"])
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    outputs = {name: s.run(None, feeds) for name, s in sessions.items()}  # warm-up
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(args.rounds):
        for name, s in sessions.items():
            t0 = clock()
            s.run(None, feeds)
            times[name].append((clock() - t0) * 1e3)
    print(f"SelectiveScan b{b} l{l} e{e} n{n}, {args.threads} thread(s), {args.rounds} rounds, {args.clock} clock; "
          f"onnxruntime {ort.__version__}")
    for name, t in times.items():
        print(f"  {name}: median {np.median(t):.3f} ms, min {min(t):.3f}, max {max(t):.3f}  ({libraries[name]})")
    if len(outputs) == 2:
        same = all(np.array_equal(x, y) for x, y in zip(*outputs.values()))
        print(f"  outputs identical: {same}")


if __name__ == "__main__":
    main()
