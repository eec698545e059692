#!/usr/bin/env python3
"""Peak memory (RSS) and time of ``mamba-export export`` on a random-weight checkpoint of a released Mamba size.

Writes a float32 checkpoint of the shape (state-spaces layout) into ``--workdir``, then exports it in a fresh process
per run, ``--runs`` times, and reports each run's peak RSS (``ru_maxrss`` of the child) and wall time beside the
checkpoint's weight bytes. ``--baseline TREE`` also exports with the mamba_export package of another source tree
(e.g. ``git worktree add /tmp/old HEAD~1``), alternating with this one, for a same-run comparison; the two exports'
weight and JSON files are compared byte for byte.

    .venv/bin/python tools/bench_export_memory.py --shape 790m [--runs 2] [--baseline /tmp/old] [--workdir /tmp/x]

Shapes: 130m (d_model 768, 24 layers), 370m (1024, 48), 790m (1536, 48), 1.4b (2048, 48), 2.8b (2560, 64); vocab
50280. The checkpoint needs the weight bytes on disk and in memory (2.8b: 11 GB), each export as much again on disk.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from tool_args import parser as tool_parser, positive_int

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"130m": (768, 24), "370m": (1024, 48), "790m": (1536, 48), "1.4b": (2048, 48), "2.8b": (2560, 64)}


def make_checkpoint(path: Path, shape: str) -> int:
    """The checkpoint's weight bytes; written once (kept between runs of this tool)."""
    import torch

    from mamba_export.checkpoint import save_checkpoint
    from mamba_export.config import MambaConfig
    from mamba_export.model import MambaLM

    d_model, n_layer = SHAPES[shape]
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        save_checkpoint(MambaLM(MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=50280)), path)
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def export_once(tree: Path, ckpt: Path, out: Path) -> tuple[float, float]:
    """(peak RSS in GiB, wall seconds) of one export in a fresh process importing mamba_export from ``tree``."""
    code = ("import resource, sys; from mamba_export.cli import main; rc = main(sys.argv[1:]); "
            "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(rc)")
    env = {**os.environ, "PYTHONPATH": str(tree)}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, "export", str(ckpt), "-o", str(out), "--force", "--no-library"],
                          env=env, cwd=tree, capture_output=True, text=True)  # cwd: `-c` puts it first on the path
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"bench_export_memory: the export with {tree} failed: {proc.stderr.strip()[-500:]}")
    peak_kb = int(next(line.split()[1] for line in proc.stderr.splitlines() if line.startswith("PEAK")))
    return peak_kb / 2**20, wall


def main() -> None:
    ap = tool_parser(__doc__)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="130m")
    ap.add_argument("--runs", type=positive_int, default=2)
    ap.add_argument("--baseline", type=Path, help="another source tree to export with, alternating")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_export_memory"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    ckpt = args.workdir / f"ckpt-{args.shape}"
    weights = make_checkpoint(ckpt, args.shape)
    trees = {"this tree": ROOT}
    if args.baseline:
        if not (args.baseline / "mamba_export").is_dir():  # else the child would import this tree's package
            ap.error(f"no mamba_export/ under {args.baseline}")
        trees["baseline"] = args.baseline.resolve()
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in trees}
    for r in range(args.runs):
        for name, tree in trees.items():
            results[name].append(export_once(tree, ckpt, args.workdir / f"out-{name.replace(' ', '-')}"))
            print(f"run {r + 1}, {name}: peak {results[name][-1][0]:.2f} GiB, {results[name][-1][1]:.1f} s",
                  file=sys.stderr)
    if args.baseline:
        a, b = (args.workdir / f"out-{n.replace(' ', '-')}" for n in trees)
        names = sorted(p.name for p in a.iterdir() if p.suffix in (".bin", ".json") and p.name != "manifest.json")
        same = all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)
        print(f"byte-identical between the two trees: {same} ({', '.join(names)}; the graphs of a tree that kept the "
              "exporter's node metadata name its source paths)")
    print(f"{args.shape} shape, float32, {weights / 2**30:.2f} GiB of weights; {os.cpu_count()} CPUs, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB of memory")
    print("| exporter | peak RSS GiB (runs) | x weights | wall s (runs) |")
    print("| --- | --- | --- | --- |")
    for name, rows in results.items():
        peaks, walls = [p for p, _ in rows], [w for _, w in rows]
        runs_p, runs_w = ", ".join(f"{p:.2f}" for p in peaks), ", ".join(f"{w:.1f}" for w in walls)
        ratio = max(peaks) * 2**30 / weights
        print(f"| {name} | {max(peaks):.2f} ({runs_p}) | {ratio:.2f} | {min(walls):.1f} ({runs_w}) |")
    shutil.rmtree(args.workdir / "out-this-tree", ignore_errors=True)
    shutil.rmtree(args.workdir / "out-baseline", ignore_errors=True)


if __name__ == "__main__":
    main()
