#!/usr/bin/env python3
"""What stop strings cost the Python runtime per generated token, against a decode step of the same run.

Each round feeds ``--tokens`` byte tokens (printable ASCII, so no stop string matches) through:

    decoder:       the codec's incremental decoder alone (what stream_text did per token before stop strings);
    watch 0 / 1 / 4: ``StopText`` (push and take, as a Generation and stream_text use it) with no stop string, one
                   ("\\n\\n") and four ("\\nQ:", "User:", "###", "<|endoftext|>").

and, with an export directory, times a greedy generation of the same run's decode steps (``decode_ms_per_step``) so
that the per-token cost can be read against a step. Medians and ranges over ``--rounds`` rounds, in microseconds a
token. There is no physical floor here: this is Python bookkeeping beside onnxruntime's work.

    .venv/bin/python tools/bench_stop_strings.py [--export out/kjv-byte] [--tokens 20000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "runtime")]
from mamba_runtime.stopping import StopText  # noqa: E402
from mamba_runtime.tokenizer import ByteCodec  # noqa: E402
from tool_args import positive_int  # noqa: E402

CASES = {"watch 0": (), "watch 1": ("\n\n",), "watch 4": ("\nQ:", "User:", "###", "<|endoftext|>")}


def per_token_us(tokens: list[int], strings: tuple[str, ...] | None) -> float:
    if strings is None:
        stream = ByteCodec().stream()
        t0 = time.perf_counter()
        for t in tokens:
            stream.push(t)
    else:
        watch = StopText(ByteCodec().stream(), strings)
        t0 = time.perf_counter()
        for t in tokens:
            watch.push(t)
            watch.take()
    return (time.perf_counter() - t0) / len(tokens) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", help="an export directory: also time its decode steps in the same run")
    p.add_argument("--tokens", type=positive_int, default=20_000, help="tokens a round (default 20000)")
    p.add_argument("--rounds", type=positive_int, default=7, help="rounds (default 7)")
    args = p.parse_args()
    tokens = [int(t) for t in np.random.default_rng(0).integers(32, 127, args.tokens)]
    times: dict[str, list[float]] = {"decoder": [], **{k: [] for k in CASES}}
    for _ in range(args.rounds):
        times["decoder"].append(per_token_us(tokens, None))
        for name, strings in CASES.items():
            times[name].append(per_token_us(tokens, strings))
    step_us = None
    if args.export:
        from mamba_runtime import MambaRuntime

        rt = MambaRuntime(args.export, provider="cpu")
        step_us = statistics.median(rt.generate("In the beginning", 200).timings["decode_ms_per_step"]
                                    for _ in range(args.rounds)) * 1e3
    print(f"Python {platform.python_version()}, {platform.machine()}, {args.tokens} tokens, {args.rounds} rounds")
    base = statistics.median(times["decoder"])
    print("| case | us/token median | min-max | over the decoder alone |" + (" share of a decode step |"
                                                                            if step_us else ""))
    print("| --- | --- | --- | --- |" + (" --- |" if step_us else ""))
    for name, values in times.items():
        med = statistics.median(values)
        extra = f" {(med - base) / step_us:.2%} |" if step_us and name != "decoder" else (" |" if step_us else "")
        print(f"| {name} | {med:.2f} | {min(values):.2f}-{max(values):.2f} | +{med - base:.2f} us |{extra}")
    if step_us:
        print(f"decode step (greedy, {args.export}): median {step_us:.0f} us")


if __name__ == "__main__":
    main()
