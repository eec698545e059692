"""GPU benchmark: decode ms/token (batch 1, 8, 64) and prefill tokens/s (2,048 tokens) of mamba-130m and mamba-1.4b
shapes with random float16 weights, for onnxruntime's CUDA execution provider with our custom-op library (CUDA graphs
off and on; with --decode-blocks also for an export with one DecodeBlock node per layer) and, when the Triton backend
runs, for the PyTorch model with backend "triton" (eager and CUDA graph). onnxruntime's decode is timed twice: one
`CudaGenerator.step()` at a time (the host waits for each step), and queued (`CudaGenerator.steps`: the next step is
queued before a step's tokens are read; the interval between two tokens reaching the host).

Floor per decode step = (weight bytes + state bytes read and written) / measured device copy bandwidth (bytes read +
written per second). Prints a table last; writes the numbers as JSON with --out. Run on the GPU machine through
tools/gpu_check.sh (it installs onnxruntime-gpu and builds the library first).

    python3 tools/bench_gpu.py --models 130m,1.4b --out bench.json
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch  # before onnxruntime: loads the CUDA libraries onnxruntime-gpu needs

import onnxruntime as ort

ort.set_default_logger_severity(3)

from cuda_graph import capture
from tool_args import parser as tool_parser, require_cuda
from mamba_export.config import MambaConfig
from mamba_export.model import MambaLM

MODELS = {  # state-spaces/mamba-130m and mamba-1.4b (vocab 50277 padded to a multiple of 8)
    "130m": dict(d_model=768, n_layer=24, vocab_size=50280),
    "1.4b": dict(d_model=2048, n_layer=48, vocab_size=50280),
}
BATCHES = (1, 8, 64)
PREFILL_TOKENS = 2048


def copy_bandwidth() -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written (median of 20, 1 GiB)."""
    src = torch.randn(256 * 2**20, device="cuda")  # 1 GiB of float32
    dst = torch.empty_like(src)
    times = []
    for _ in range(25):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    return 2 * 2**30 / statistics.median(times[5:])


def stats_ms(times_s: list[float]) -> dict:
    ms = sorted(t * 1e3 for t in times_s)
    return {"median_ms": statistics.median(ms), "p90_ms": ms[int(0.9 * (len(ms) - 1))], "n": len(ms)}


def build_model(name: str, seed: int = 0) -> MambaLM:
    torch.manual_seed(seed)
    model = MambaLM(MambaConfig(**MODELS[name]))
    with torch.no_grad():  # random but Mamba-like: keep dt in its usual range so the state neither dies nor blows up
        for layer in model.backbone.layers:
            layer.mixer.dt_proj.bias.uniform_(-6.0, -2.0)
    return model.half().eval()


def state_bytes(cfg: MambaConfig, batch: int) -> int:
    return 4 * cfg.n_layer * batch * cfg.d_inner * (cfg.d_state + cfg.d_conv - 1)


def step_times(gen, steps: int) -> list[float]:
    """Seconds of each of ``steps`` calls of ``gen.step()`` (a CudaGenerator; the host waits for each step)."""
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        gen.step()
        times.append(time.perf_counter() - t0)
    return times


def queued_intervals(gen, steps: int) -> list[float]:
    """Seconds between two steps' tokens reaching the host, over ``steps`` intervals of ``gen.steps(lookahead=1)``
    (the next step queued before a step's tokens are read: what a streaming application sees)."""
    stamps = [time.perf_counter()]
    for _ in gen.steps(steps + 1, lookahead=1):
        stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps[1:], stamps[2:])]


def bench_ort_decode(export_dir: Path, batch: int, cuda_graph: bool, steps: int, vocab: int) -> dict:
    from mamba_runtime.gpu import CudaGenerator

    gen = CudaGenerator(export_dir, batch, cuda_graph=cuda_graph, custom_ops="require", verify=False)
    rng = np.random.default_rng(batch)
    gen.prefill([rng.integers(0, vocab, 4).tolist() for _ in range(batch)])
    for _ in range(8):  # warm-up (the first steps capture the CUDA graphs)
        gen.step()
    result = stats_ms(step_times(gen, steps))
    result["queued"] = stats_ms(queued_intervals(gen, steps))
    return result


def ort_prefill_runner(export_dir: Path, cfg: MambaConfig, tokens: int):
    """A callable running model_last.onnx on ``tokens`` random ids (batch 1) with every input and output on the GPU."""
    from mamba_runtime.gpu import CudaDevice

    manifest = json.loads((export_dir / "manifest.json").read_text())
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.register_custom_ops_library(str(export_dir / manifest["custom_op_library"]))
    dev = CudaDevice()
    sess = ort.InferenceSession(str(export_dir / "model_last.onnx"), so, providers=dev.providers())
    binding = sess.io_binding()
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, tokens), dtype=np.int64)
    binding.bind_ortvalue_input("input_ids", ort.OrtValue.ortvalue_from_numpy(ids, "cuda", 0))
    for i in range(cfg.n_layer):
        for kind, shape in (("conv", (1, cfg.d_inner, cfg.d_conv - 1)), ("ssm", (1, cfg.d_inner, cfg.d_state))):
            binding.bind_ortvalue_input(f"past_{kind}.{i}", dev.zeros(shape, np.float32))
            binding.bind_output(f"present_{kind}.{i}", "cuda")
    binding.bind_output("logits", "cuda")
    return lambda: sess.run_with_iobinding(binding)


def bench_ort_prefill(export_dir: Path, cfg: MambaConfig, tokens: int) -> dict:
    run = ort_prefill_runner(export_dir, cfg, tokens)
    times = []
    for i in range(7):
        t0 = time.perf_counter()
        run()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    s = stats_ms(times)
    s["tokens_per_s"] = tokens / (s["median_ms"] / 1e3)
    return s


def kernel_table(fn, reps: int, rows: int = 12) -> str:
    """Device kernels (onnxruntime's too: CUPTI sees every kernel of the process) of ``reps`` calls of ``fn``,
    sorted by total device time."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    total: dict[str, list] = {}
    for e in events:
        t = total.setdefault(e.name, [0.0, 0])
        t[0] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        t[1] += 1
    busy = sum(v[0] for v in total.values())
    lines = [f"{reps} calls: {busy / reps:.1f} us of kernels per call, {len(events) / reps:.0f} kernels per call"]
    for name, (us, n) in sorted(total.items(), key=lambda kv: -kv[1][0])[:rows]:
        lines.append(f"  {us / reps:9.1f} us/call {n / reps:6.1f}x  {name[:110]}")
    return "\n".join(lines)


def profile_ort(export_dir: Path, cfg: MambaConfig) -> str:
    """Kernel breakdown of one decode step at batch 1 and 64 (no CUDA graph), and of a 2,048-token prefill."""
    from mamba_runtime.gpu import CudaGenerator

    out = []
    for b in (1, 64):
        gen = CudaGenerator(export_dir, b, custom_ops="require", verify=False)
        gen.prefill([[1, 2, 3]] * b)
        out.append(f"decode step, batch {b}: " + kernel_table(gen.step, 10))
        del gen
    out.append(f"prefill {PREFILL_TOKENS} tokens: " + kernel_table(ort_prefill_runner(export_dir, cfg, PREFILL_TOKENS), 3))
    return "\n".join(out)


def ops_benchmark() -> str:
    """Kernel time of each custom op alone (one-node float16 graphs, all I/O on the GPU) at the mixer shapes of the
    benchmark models: prefill of 2,048 tokens (batch 1) and a decode step (batch 1 and 64)."""
    from onnx import TensorProto, helper

    lib = __import__("mamba_runtime").custom_op_library_path()
    rng = np.random.default_rng(0)
    out = []
    for name, m in MODELS.items():
        e, n, k, r = 2 * m["d_model"], 16, 4, -(-m["d_model"] // 16)
        l = PREFILL_TOKENS
        cases = {
            "SelectiveScan": ([("u", 1, l, e), ("delta", 1, l, e), ("A", e, n), ("B", 1, l, n), ("C", 1, l, n),
                               ("D", e), ("z", 1, l, e), ("delta_bias", e), ("ssm_state_in", 1, e, n)],
                              {"u", "delta", "B", "C", "z", "y"}, [("y", 1, l, e), ("ssm_state_out", 1, e, n)]),
            "CausalConv1d": ([("x", 1, l, e), ("conv_state_in", 1, e, k - 1), ("weight", e, k), ("bias", e)],
                             {"x", "y"}, [("y", 1, l, e), ("conv_state_out", 1, e, k - 1)]),
        }
        for b in (1, 64):
            cases[f"DecodeStep b{b}"] = (
                [("xz", b, 1, 2 * e), ("conv_state_in", b, e, k - 1), ("ssm_state_in", b, e, n), ("conv_weight", e, k),
                 ("conv_bias", e), ("x_proj_weight", r + 2 * n, e), ("dt_proj_weight", e, r), ("dt_bias", e),
                 ("A", e, n), ("D", e)], {"xz", "y"}, [("y", b, 1, e), ("conv_state_out", b, e, k - 1),
                                                   ("ssm_state_out", b, e, n)])
        for case, (ins, t_names, outs) in cases.items():
            op = case.split()[0]
            ttype = lambda nm: TensorProto.FLOAT16 if nm in t_names else TensorProto.FLOAT  # noqa: E731
            graph = helper.make_graph(
                [helper.make_node(op, [i[0] for i in ins], [o[0] for o in outs], domain="ai.mamba_export")], op,
                [helper.make_tensor_value_info(i[0], ttype(i[0]), list(i[1:])) for i in ins],
                [helper.make_tensor_value_info(o[0], ttype(o[0]), list(o[1:])) for o in outs])
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                            helper.make_opsetid("ai.mamba_export", 1)], ir_version=10)
            so = ort.SessionOptions()
            so.log_severity_level = 3
            so.register_custom_ops_library(lib)
            sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CUDAExecutionProvider"])
            binding = sess.io_binding()
            for nm, *shape in ins:
                arr = rng.standard_normal(shape).astype(np.float16 if nm in t_names else np.float32)
                if nm == "A":
                    arr = -np.exp(0.5 * arr)
                if nm in ("delta_bias", "dt_bias"):
                    arr = arr - 3.0
                binding.bind_ortvalue_input(nm, ort.OrtValue.ortvalue_from_numpy(arr, "cuda", 0))
            for nm, *_ in outs:
                binding.bind_output(nm, "cuda")
            out.append(f"{name} {case}: " + kernel_table(lambda: sess.run_with_iobinding(binding), 5, rows=4))
    return "\n".join(out)


def bench_triton(model: MambaLM, batches, steps: int, tokens: int) -> dict:
    """PyTorch model with backend "triton": decode eager and as a CUDA graph, prefill eager."""
    model = model.cuda()
    model.set_backend("triton")
    out = {"backend": model.backend.name}
    cfg = model.config
    with torch.no_grad():
        for b in batches:
            state = model.empty_state(b)
            tok = torch.randint(0, cfg.vocab_size, (b,), device="cuda")

            def eager_step():
                nonlocal state, tok
                logits, state = model.step(tok, state)
                tok = logits.argmax(-1)
                return tok.cpu()

            for _ in range(5):
                eager_step()
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                eager_step()
                times.append(time.perf_counter() - t0)
            out[f"decode_b{b}_eager"] = stats_ms(times)

            static = model.empty_state(b)
            static_tok = torch.zeros(b, dtype=torch.long, device="cuda")

            def captured():
                logits, st = model.step(static_tok, static)
                static.conv.copy_(st.conv)
                static.ssm.copy_(st.ssm)
                static_tok.copy_(logits.argmax(-1))

            graph = capture(captured)
            for _ in range(5):
                graph.replay()
                static_tok.cpu()
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                graph.replay()
                static_tok.cpu()
                times.append(time.perf_counter() - t0)
            out[f"decode_b{b}_graph"] = stats_ms(times)
            del graph
        ids = torch.randint(0, cfg.vocab_size, (1, tokens), device="cuda")
        times = []
        for i in range(5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(ids)
            torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - t0)
        s = stats_ms(times)
        s["tokens_per_s"] = tokens / (s["median_ms"] / 1e3)
        out["prefill"] = s
    model.cpu()
    torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = tool_parser(__doc__)
    ap.add_argument("--models", default="130m,1.4b")
    ap.add_argument("--steps", type=int, default=64, help="timed decode steps per setting")
    ap.add_argument("--no-triton", action="store_true")
    ap.add_argument("--profile", action="store_true", help="print the device kernels of onnxruntime decode steps")
    ap.add_argument("--ops", action="store_true", help="first time each custom op alone (kernel time)")
    ap.add_argument("--decode-blocks", action="store_true",
                    help="also export with --decode-blocks on (one DecodeBlock node per layer) and time its decoding")
    ap.add_argument("--workdir", default=None, help="where to export (default: a temporary folder)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    require_cuda("bench_gpu", onnxruntime=True)

    from mamba_export.export import export_model

    card = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    results = {"card": card, "onnxruntime": ort.__version__, "torch": torch.__version__,
               "copy_bandwidth_GBps": bw / 1e9, "models": {}}
    print(f"card {card}, onnxruntime {ort.__version__}, torch {torch.__version__}, copy {bw / 1e9:.0f} GB/s", flush=True)
    if args.ops:
        results["ops_kernels"] = ops_benchmark()
        print(results["ops_kernels"], flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_gpu_"))
    for name in filter(None, args.models.split(",")):
        t0 = time.perf_counter()
        model = build_model(name)
        cfg = model.config
        export_dir = export_model(model, work / name, last_logits=True, force=True)
        weight_bytes = (export_dir / "weights.bin").stat().st_size
        r = {"export_s": time.perf_counter() - t0, "weight_bytes": weight_bytes, "ort": {}, "floor_ms": {}}
        print(f"{name}: exported in {r['export_s']:.0f} s, weights {weight_bytes / 1e6:.0f} MB", flush=True)
        for b in BATCHES:
            r["floor_ms"][f"b{b}"] = (weight_bytes + 2 * state_bytes(cfg, b)) / bw * 1e3
            for graph in (False, True):
                key = f"decode_b{b}_{'graph' if graph else 'plain'}"
                try:
                    r["ort"][key] = bench_ort_decode(export_dir, b, graph, args.steps, cfg.vocab_size)
                except Exception as e:  # report and go on: one failing setting must not hide the others
                    r["ort"][key] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
                print(f"  ort {key}: {r['ort'][key]}", flush=True)
        if args.decode_blocks:
            blocks_dir = export_model(model, work / f"{name}-blocks", force=True, decode_blocks="on")
            r["ort_blocks"] = {}
            for b in BATCHES:
                for graph in (False, True):
                    key = f"decode_b{b}_{'graph' if graph else 'plain'}"
                    try:
                        r["ort_blocks"][key] = bench_ort_decode(blocks_dir, b, graph, args.steps, cfg.vocab_size)
                    except Exception as e:
                        r["ort_blocks"][key] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
                    print(f"  ort decode blocks {key}: {r['ort_blocks'][key]}", flush=True)
            # The same export with the kernels' early start off (kernels/cuda/decode_block.cu, "Early start").
            for b in (1, 8):
                key = f"decode_b{b}_graph_no_early_start"
                os.environ["MAMBA_EXPORT_CUDA_PDL"] = "0"
                try:
                    r["ort_blocks"][key] = bench_ort_decode(blocks_dir, b, True, args.steps, cfg.vocab_size)
                except Exception as e:
                    r["ort_blocks"][key] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
                finally:
                    del os.environ["MAMBA_EXPORT_CUDA_PDL"]
                print(f"  ort decode blocks {key}: {r['ort_blocks'][key]}", flush=True)
        r["ort"]["prefill"] = bench_ort_prefill(export_dir, cfg, PREFILL_TOKENS)
        print(f"  ort prefill {PREFILL_TOKENS}: {r['ort']['prefill']}", flush=True)
        if args.profile:
            r["ort_kernels"] = profile_ort(export_dir, cfg)
            print(r["ort_kernels"], flush=True)
        if not args.no_triton:
            try:
                r["triton"] = bench_triton(model, BATCHES, args.steps, PREFILL_TOKENS)
            except Exception as e:
                r["triton"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
            print(f"  triton: {r['triton']}", flush=True)
        results["models"][name] = r
        if args.out:  # after each model, so that a run cut short keeps what it measured
            Path(args.out).write_text(json.dumps(results, indent=1))
        del model
        torch.cuda.empty_cache()
    print_table(results)


def print_table(results: dict) -> None:
    print(f"\n{results['card']}; copy bandwidth {results['copy_bandwidth_GBps']:.0f} GB/s; float16 weights; "
          "decode = median ms per token (one decode step + sampling + token to host); +q = steps queued one ahead "
          "of the host (CudaGenerator.steps)")
    print(f"{'model':6} {'batch':>5} {'floor':>7} {'ort':>8} {'ort+graph':>9} {'ort+g+q':>8} {'blocks':>8} "
          f"{'blk+graph':>9} {'blk+g+q':>8} {'triton':>8} {'tri+graph':>9}")
    get = lambda d, k: d.get(k, {}).get("median_ms", float("nan"))  # noqa: E731
    queued = lambda d, k: d.get(k, {}).get("queued", {}).get("median_ms", float("nan"))  # noqa: E731
    for name, r in results["models"].items():
        tri, blk = r.get("triton", {}), r.get("ort_blocks", {})
        for b in BATCHES:
            print(f"{name:6} {b:5d} {r['floor_ms'][f'b{b}']:7.3f} {get(r['ort'], f'decode_b{b}_plain'):8.3f} "
                  f"{get(r['ort'], f'decode_b{b}_graph'):9.3f} {queued(r['ort'], f'decode_b{b}_graph'):8.3f} "
                  f"{get(blk, f'decode_b{b}_plain'):8.3f} {get(blk, f'decode_b{b}_graph'):9.3f} "
                  f"{queued(blk, f'decode_b{b}_graph'):8.3f} {get(tri, f'decode_b{b}_eager'):8.3f} "
                  f"{get(tri, f'decode_b{b}_graph'):9.3f}")
        tri_p = tri.get("prefill", {}).get("tokens_per_s", float("nan"))
        print(f"{name:6} prefill {PREFILL_TOKENS} tokens: ort {r['ort']['prefill']['tokens_per_s']:.0f} tok/s, "
              f"triton {tri_p:.0f} tok/s")


if __name__ == "__main__":
    main()
