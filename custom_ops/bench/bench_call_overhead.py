"""Time per call of one custom op inside a graph: a chain of --nodes nodes of the op, timed by session.run / nodes.

    .venv/bin/python custom_ops/bench/bench_call_overhead.py [--library LIB ...] [--no-library] [--threads 2]
        [--nodes 200] [--runs 100] [--rounds 5] [--cases decode_tiny,decode_130m,rms_norm,add_rms_norm]

The chain feeds each node's outputs to the next one (states for DecodeStep, y and the residual for the norms), so
every node runs, one after the other, as in the exported graphs; session.run's own cost is shared by --nodes calls.
Cases (batch 1, one token, float32):

    decode_tiny   DecodeStep with e=16, n=16, k=4, r=1: almost no kernel work, so this is the fixed cost of a call
                  (onnxruntime's node dispatch, the binding's input checks, output and scratch allocation)
    decode_130m   DecodeStep at mamba-130m's mixer shape (e=1536, n=16, k=4, r=48)
    rms_norm      RMSNorm of a (1, 1, 768) row (mamba-130m's d_model)
    add_rms_norm  AddRMSNorm of (1, 1, 768) rows

Each --library is a build of libmamba_export_ops.so (default: the package's); --no-library adds a session without
any library, where the graphs' model-local functions of standard ops run instead (also what a library without a
kernel for the op runs). With several, the sessions run interleaved round by round so that a shared machine's load
falls on all of them alike. Prints the median microseconds per call over the rounds, and each round's value.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from mamba_export.export import onnx_ops  # noqa: E402  (the op schemas and fallback functions)

F = TensorProto.FLOAT


def _model(nodes: list, inputs: list, outputs: list, initializers: list) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "chain", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", onnx_ops.OPSET),
                                                    helper.make_opsetid(onnx_ops.DOMAIN, 1)], ir_version=10)
    model.functions.extend(onnx_ops.model_functions())
    return model


def _tensor(name: str, array: np.ndarray) -> onnx.TensorProto:
    return onnx.numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name)


def decode_chain(count: int, e: int, n: int, k: int, r: int) -> tuple[onnx.ModelProto, dict]:
    """`count` DecodeSteps, each taking the previous one's states; xz and the parameters shared by all."""
    rng = np.random.default_rng(0)
    params = {"conv_weight": rng.standard_normal((e, k)) * 0.5, "conv_bias": rng.standard_normal(e) * 0.1,
              "x_proj_weight": rng.standard_normal((r + 2 * n, e)) / e ** 0.5,
              "dt_proj_weight": rng.standard_normal((e, r)) / r ** 0.5, "dt_bias": rng.standard_normal(e) * 0.1 - 2,
              "A": -np.exp(rng.uniform(-1, 1, (e, n))), "D": rng.standard_normal(e)}
    nodes, conv, ssm = [], "conv_0", "ssm_0"
    for i in range(count):
        outs = [f"y_{i}", f"conv_{i + 1}", f"ssm_{i + 1}"]
        nodes.append(helper.make_node("DecodeStep", ["xz", conv, ssm, *params], outs, domain=onnx_ops.DOMAIN))
        conv, ssm = outs[1], outs[2]
    inputs = [helper.make_tensor_value_info("xz", F, [1, 1, 2 * e]),
              helper.make_tensor_value_info("conv_0", F, [1, e, k - 1]),
              helper.make_tensor_value_info("ssm_0", F, [1, e, n])]
    outputs = [helper.make_tensor_value_info(name, F, None) for name in (f"y_{count - 1}", conv, ssm)]
    feeds = {"xz": rng.standard_normal((1, 1, 2 * e)).astype(np.float32),
             "conv_0": rng.standard_normal((1, e, k - 1)).astype(np.float32),
             "ssm_0": np.zeros((1, e, n), np.float32)}
    return _model(nodes, inputs, outputs, [_tensor(k_, v) for k_, v in params.items()]), feeds


def norm_chain(count: int, d: int, add: bool) -> tuple[onnx.ModelProto, dict]:
    """`count` RMSNorms (y feeds the next x) or AddRMSNorms (y and residual_out feed the next x and residual)."""
    rng = np.random.default_rng(0)
    weight = _tensor("weight", 1.0 + 0.1 * rng.standard_normal(d))
    nodes, x, residual = [], "x_0", "residual_0"
    for i in range(count):
        if add:
            outs = [f"x_{i + 1}", f"residual_{i + 1}"]
            nodes.append(helper.make_node("AddRMSNorm", [x, residual, "weight"], outs, domain=onnx_ops.DOMAIN,
                                          epsilon=1e-5))
            x, residual = outs
        else:
            nodes.append(helper.make_node("RMSNorm", [x, "weight"], [f"x_{i + 1}"], domain=onnx_ops.DOMAIN,
                                          epsilon=1e-5))
            x = f"x_{i + 1}"
    inputs = [helper.make_tensor_value_info("x_0", F, [1, 1, d])]
    feeds = {"x_0": rng.standard_normal((1, 1, d)).astype(np.float32)}
    outputs = [helper.make_tensor_value_info(x, F, None)]
    if add:
        inputs.append(helper.make_tensor_value_info("residual_0", F, [1, 1, d]))
        feeds["residual_0"] = rng.standard_normal((1, 1, d)).astype(np.float32)
        outputs.append(helper.make_tensor_value_info(residual, F, None))
    return _model(nodes, inputs, outputs, [weight]), feeds


CASES = {
    "decode_tiny": lambda count: decode_chain(count, e=16, n=16, k=4, r=1),
    "decode_130m": lambda count: decode_chain(count, e=1536, n=16, k=4, r=48),
    "rms_norm": lambda count: norm_chain(count, 768, add=False),
    "add_rms_norm": lambda count: norm_chain(count, 768, add=True),
}


def make_session(model: onnx.ModelProto, library: str | None, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if library:
        options.register_custom_ops_library(library)
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def per_call_us(session: ort.InferenceSession, feeds: dict, runs: int, count: int) -> float:
    """Median over `runs` of session.run's time divided by the number of nodes, in microseconds."""
    for _ in range(5):
        session.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return statistics.median(times) / count * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--library", action="append", default=[], help="a library build to time (repeatable)")
    ap.add_argument("--no-library", action="store_true", help="also time the model-local functions (no library)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--nodes", type=int, default=200)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args()
    if not args.library:
        from mamba_runtime import custom_op_library_path

        args.library = [custom_op_library_path()]
    libraries: list[str | None] = list(args.library) + ([None] if args.no_library else [])
    label = lambda lib: lib or "no library (functions)"  # noqa: E731
    for case in args.cases.split(","):
        model, feeds = CASES[case](args.nodes)
        sessions = [make_session(model, lib, args.threads) for lib in libraries]
        rounds: list[list[float]] = [[] for _ in libraries]
        for _ in range(args.rounds):
            for i, session in enumerate(sessions):
                rounds[i].append(per_call_us(session, feeds, args.runs, args.nodes))
        print(f"{case} ({args.nodes} nodes, {args.threads} threads, {args.rounds} rounds x {args.runs} runs):")
        for lib, values in zip(libraries, rounds):
            print(f"  {statistics.median(values):8.2f} us/call  [{', '.join(f'{v:.2f}' for v in values)}]  {label(lib)}")


if __name__ == "__main__":
    main()
