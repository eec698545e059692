"""A/B of two exporters on one GPU, in one process: decode.onnx of the same random model (tools/bench_gpu.py's
build_model) exported by another source tree (``--old``, e.g. ``git archive <commit> mamba_export | tar -x -C
/tmp/old``) and by this one, both with ``--decode-blocks on`` and run through this tree's runtime and custom-op
library (MAMBA_EXPORT_OPS_LIBRARY), CUDA graphs on. Per export, median [min, max] over rounds of:

    enqueue  GPU time per decode step: 300 steps queued back to back, one synchronisation at the end
    step     CudaGenerator.step() (the host waits for each step)
    queued   CudaGenerator.steps(lookahead=1): the interval between two steps' tokens reaching the host

then whether greedy tokens agree. Run on the GPU machine (onnxruntime-gpu and CuPy installed):

    python3 tools/ab_decode_exports.py --old /tmp/old --model 130m [--batch 1] [--rounds 5]
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch  # noqa: F401  (before onnxruntime: loads the CUDA libraries onnxruntime-gpu needs)

from bench_gpu import queued_intervals, step_times
from tool_args import parser as tool_parser, require_cuda

TOOLS = Path(__file__).resolve().parent


def export(root: Path, model: str, out: Path) -> Path:
    """Export with the mamba_export package under ``root`` (in a child process, so that the trees do not mix)."""
    code = (f"import sys; sys.path[:0] = [{str(root)!r}, {str(TOOLS)!r}]; import bench_gpu; "
            "from mamba_export.export import export_model; "
            f"export_model(bench_gpu.build_model({model!r}), {str(out)!r}, force=True, decode_blocks='on')")
    subprocess.run([sys.executable, "-c", code], check=True)
    return out


def enqueue_ms(gen, n: int = 300) -> float:
    (row,), (event,) = gen._token_rows(1)
    gen.stream.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        gen._enqueue_step(row, event)
    gen.stream.synchronize()
    return (time.perf_counter() - t0) / n * 1e3


def main() -> None:
    ap = tool_parser(__doc__)
    ap.add_argument("--old", required=True, help="a source tree holding the other exporter's mamba_export/")
    ap.add_argument("--model", default="130m")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workdir", default="/tmp/ab_decode_exports")
    args = ap.parse_args()
    if not (Path(args.old) / "mamba_export").is_dir():
        sys.exit(f"ab_decode_exports: no mamba_export/ under {args.old}")
    require_cuda("ab_decode_exports", onnxruntime=True)
    from mamba_runtime.gpu import CudaGenerator

    work = Path(args.workdir)
    dirs = {"old": export(Path(args.old).resolve(), args.model, work / "old"),
            "new": export(TOOLS.parent, args.model, work / "new")}
    b = args.batch
    gens = {tag: CudaGenerator(d, b, cuda_graph=True, custom_ops="require", verify=False) for tag, d in dirs.items()}
    for g in gens.values():
        g.prefill([[1, 2, 3, 4]] * b)
        for _ in range(10):
            g.step()
    res = {tag: {"enqueue": [], "step": [], "queued": []} for tag in gens}
    for _ in range(args.rounds):
        for tag, g in gens.items():  # interleaved, so that both see the same clocks
            res[tag]["enqueue"].append(enqueue_ms(g))
            res[tag]["step"].append(statistics.median(step_times(g, 100)) * 1e3)
            res[tag]["queued"].append(statistics.median(queued_intervals(g, 100)) * 1e3)
    for tag in gens:
        print(f"{args.model} b{b} {tag}: " + ", ".join(
            f"{k} {statistics.median(v):.4f} ms [{min(v):.4f}, {max(v):.4f}]" for k, v in res[tag].items()), flush=True)
    prompts = [[5, 6, 7]] * b
    same = (gens["old"].generate(prompts, 24) == gens["new"].generate(prompts, 24)).all()
    print(f"greedy tokens of the two exports equal: {bool(same)}")


if __name__ == "__main__":
    main()
