"""Nsight Compute profile of the DecodeBlock CUDA kernel inside real decode steps (GPU machine).

Exports a mamba-130m- or 1.4b-shaped model (random float16 weights, tools/bench_gpu.py's) with ``--decode-blocks on``,
then, under ncu, runs a few decode steps through ``CudaGenerator`` (no CUDA graph, so that ncu sees each launch) and
profiles ``--count`` launches of the DecodeBlock kernels after the first step's. Prints ncu's details page (duration,
occupancy, memory throughput, warp-stall reasons, source counters with ``--set full``) and leaves the report in
``--out``. ncu replays each profiled kernel, so the early start (kernels/cuda/decode_block.cu) does not overlap
kernels here: the times are of one kernel alone.

    python3 tools/ncu_decode_block.py --model 130m --batch 1 --out $OUT/decode_block   # needs ncu on PATH or in /usr/local/cuda/bin

Run it after tools/gpu_check.sh has installed onnxruntime-gpu (same PYTHONPATH and MAMBA_EXPORT_OPS_LIBRARY).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from tool_args import parser as tool_parser


def steps(export_dir: str, batch: int, n: int) -> None:
    """The profiled process: prefill, then ``n`` decode steps."""
    import torch  # noqa: F401  (loads the CUDA libraries onnxruntime-gpu needs)
    from mamba_runtime.gpu import CudaGenerator

    gen = CudaGenerator(export_dir, batch, cuda_graph=False, custom_ops="require", verify=False)
    gen.prefill([[1, 2, 3]] * batch)
    for _ in range(n):
        gen.step()


def main() -> None:
    ap = tool_parser(__doc__)
    ap.add_argument("--model", default="130m", choices=["130m", "1.4b"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--count", type=int, default=3, help="DecodeBlock launches to profile")
    ap.add_argument("--set", default="full", help="ncu section set (full, detailed, basic)")
    ap.add_argument("--out", default="decode_block", help="report path without .ncu-rep")
    ap.add_argument("--run-steps", metavar="EXPORT_DIR", help=argparse.SUPPRESS)  # the profiled child
    args = ap.parse_args()
    if args.run_steps:
        steps(args.run_steps, args.batch, 3)
        return
    ncu = shutil.which("ncu") or "/usr/local/cuda/bin/ncu"
    if not Path(ncu).exists():
        sys.exit("ncu_decode_block: ncu not found (PATH, /usr/local/cuda/bin)")
    sys.path.insert(0, str(Path(__file__).parent))
    import bench_gpu
    from mamba_export.export import export_model

    work = Path(tempfile.mkdtemp(prefix="ncu_decode_block_"))
    export_dir = export_model(bench_gpu.build_model(args.model), work / "export", force=True, decode_blocks="on")
    n_layer = bench_gpu.MODELS[args.model]["n_layer"]
    # The op's kernels (the fused cooperative kernel, or the split path's) are the ones taking DecodeBlockArgs; the
    # first decode step's are skipped (first-launch costs).
    cmd = [ncu, "--cache-control", "none", "--clock-control", "none", "--set", args.set,
           "--kernel-name-base", "demangled", "-k", "regex:DecodeBlockArgs", "--launch-skip", str(n_layer - 1),
           "--launch-count", str(args.count), "-f", "-o", args.out,
           sys.executable, __file__, "--model", args.model, "--batch", str(args.batch), "--run-steps", str(export_dir)]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=os.environ)
    subprocess.run([ncu, "--import", f"{args.out}.ncu-rep", "--page", "details"], check=True)
    # Per-SASS-instruction counters (executed instructions, warp-stall samples by reason): where inside the kernel
    # the time goes. Written next to the report; large for the fused kernel.
    with open(f"{args.out}_sass.csv", "w") as f:
        subprocess.run([ncu, "--import", f"{args.out}.ncu-rep", "--page", "source", "--print-source", "sass", "--csv"],
                       stdout=f, check=False)


if __name__ == "__main__":
    main()
