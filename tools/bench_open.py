#!/usr/bin/env python3
"""Time to open an export directory with its checksums checked, in the Python and the C++ runtime.

Both runtimes check the sha256 of the weight files (weights.bin, decode_weights_f16/i8.bin) in a thread while
onnxruntime loads them, and every other file before anything reads it. Before that, every file was hashed first and
the sessions loaded after. Each round times, in this order:

    hash only:        sha256 of every listed file, one after another (what the old open did first);
    before (Python):  that hashing, then ``MambaRuntime(verify=False)``: the old verified open;
    now (Python):     ``MambaRuntime(verify=True)``;
    floor (Python):   ``MambaRuntime(verify=False)``: loading alone, which a verified open cannot beat;
    now / floor (C++): with ``--cpp BINARY``, ``mamba_generate DIR --prompt-ids 1 --max-new-tokens 1`` with and
                      without ``--no-verify`` (a whole process: start, open, one token);
    before (C++):     with ``--cpp-before BINARY``, the same verified run of an older build (e.g. of the commit
                      before this change, built elsewhere with cmake).

Medians and ranges over ``--rounds`` rounds, the ratio to the floor, and to the old open for the Python runtime.
The page cache is left as it is (the export is read once before the first round), so these are warm opens.

    .venv/bin/python tools/bench_open.py EXPORT_DIR [--rounds 5] [--threads 2] [--cpp runtime/cpp/build/mamba_generate]
        [--cpp-before OLD_BUILD/mamba_generate]
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))

from mamba_runtime import MambaRuntime  # noqa: E402
from mamba_runtime.manifest import open_export_dir, sha256_file  # noqa: E402
from tool_args import parser as tool_parser, positive_int


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = tool_parser(__doc__)
    ap.add_argument("export_dir", type=Path)
    ap.add_argument("--rounds", type=positive_int, default=5)
    ap.add_argument("--threads", type=positive_int, default=None,
                    help="onnxruntime intra-op threads (default: its own)")
    ap.add_argument("--cpp", type=Path, help="the mamba_generate binary, to time the C++ runtime too")
    ap.add_argument("--cpp-before", type=Path, help="an older mamba_generate build, timed verified beside --cpp")
    args = ap.parse_args()
    if args.cpp_before and not args.cpp:
        ap.error("--cpp-before needs --cpp (the current build, whose floor the rows are compared to)")
    for binary in (args.cpp, args.cpp_before):
        if binary is not None and not binary.is_file():
            ap.error(f"{binary}: no such file (a built mamba_generate)")
    info = open_export_dir(args.export_dir, verify=False)
    files = [info.path / n for n in info.manifest["files"]]
    size = sum(f.stat().st_size for f in files)

    def hash_all():
        for f in files:
            sha256_file(f)

    def py_open(verify):
        return lambda: MambaRuntime(info.path, provider="cpu", threads=args.threads, verify=verify)

    def cpp_open(verify, binary=None):
        cmd = [str(binary or args.cpp), str(info.path), "--prompt-ids", "1", "--max-new-tokens", "1"]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        cmd += [] if verify else ["--no-verify"]
        return lambda: subprocess.run(cmd, check=True, capture_output=True)

    hash_all()  # warm the page cache
    rows = {"hash only": [], "before (Python)": [], "now (Python)": [], "floor (Python)": []}
    if args.cpp_before:
        rows["before (C++)"] = []
    if args.cpp:
        rows.update({"now (C++)": [], "floor (C++)": []})
    load = os.getloadavg()
    for r in range(args.rounds):
        rows["hash only"].append(timed(hash_all))
        rows["before (Python)"].append(timed(lambda: (open_export_dir(info.path, verify=True), py_open(False)())))
        rows["now (Python)"].append(timed(py_open(True)))
        rows["floor (Python)"].append(timed(py_open(False)))
        if args.cpp_before:
            rows["before (C++)"].append(timed(cpp_open(True, args.cpp_before)))
        if args.cpp:
            rows["now (C++)"].append(timed(cpp_open(True)))
            rows["floor (C++)"].append(timed(cpp_open(False)))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in rows.items()), file=sys.stderr)
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"{info.path}: {size / 1e9:.2f} GB in {len(files)} files; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {load[0]:.2f} before, {os.getloadavg()[0]:.2f} after; "
          f"{args.rounds} rounds")
    print("| open | median s (range) | x floor | vs before |")
    print("| --- | --- | --- | --- |")
    for k, v in rows.items():
        floor = med["floor (C++)"] if "C++" in k else med["floor (Python)"]
        ratio = f"{med[k] / floor:.2f}" if k != "hash only" else "-"
        before = {"now (Python)": "before (Python)", "now (C++)": "before (C++)"}.get(k)
        vs = f"{med[before] / med[k]:.2f}x faster" if before in med else "-"
        print(f"| {k} | {med[k]:.2f} ({min(v):.2f}-{max(v):.2f}) | {ratio} | {vs} |")


if __name__ == "__main__":
    main()
