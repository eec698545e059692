#!/usr/bin/env python3
"""CPU benchmark of the Python runtime's per-token overhead and of decode latency against position.

On the mamba-130m shape (d_model 768, 24 layers, vocab 50280; random weights), batch 1, ``--threads`` threads:

    raw session.run:  decode.onnx with numpy feeds, the state passed back through Python each step, argmax;
    raw IOBinding:    decode.onnx bound once to double-buffered OrtValues (what the runtime does), argmax;
    runtime:          ``Generation.step()`` of mamba_runtime (greedy), everything included;
    position:         the runtime's decode ms/step of a sequence at position ``--far`` (10,000) against one at
                      position 100, the two stepped in alternating blocks.

The three decode loops run interleaved in blocks (``--blocks`` x ``--block-steps`` each), so machine noise hits
all alike; each block's median is one sample, and the table gives the median and p10-p90 of the samples.
Not a test. Usage:

    .venv/bin/python tools/bench_runtime_cpu.py [--threads 2] [--blocks 15] [--block-steps 20] [--far 10000]
        [--export DIR (reuse an export)] [--json out.json]
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from tool_args import parser as tool_parser, positive_int


def make_export(root: Path, args) -> Path:
    """A random-weight mamba-130m-shaped checkpoint, exported with the custom-op library."""
    import torch

    from mamba_export.checkpoint import save_checkpoint
    from mamba_export.config import MambaConfig
    from mamba_export.export import export_checkpoint
    from mamba_export.model import MambaLM

    torch.manual_seed(0)
    model = MambaLM(MambaConfig(d_model=768, n_layer=24, vocab_size=50280)).eval()
    ckpt = save_checkpoint(model, root / "ckpt")
    return export_checkpoint(ckpt, root / "export", last_logits=True)


def raw_run_loop(rt) -> callable:
    """A decode loop over plain ``session.run`` with numpy feeds; returns step() -> seconds."""
    sess, info = rt.decode_session, rt.info
    conv, ssm = info.state_shapes(1)
    feeds = {"input_ids": np.array([[1]], dtype=np.int64)}
    for i in range(info.n_layer):
        feeds[f"past_conv.{i}"] = np.zeros(conv, np.float32)
        feeds[f"past_ssm.{i}"] = np.zeros(ssm, np.float32)
    names = [o.name for o in sess.get_outputs()]

    def step() -> float:
        t0 = time.perf_counter()
        outs = sess.run(None, feeds)
        for name, value in zip(names[1:], outs[1:]):
            feeds[name.replace("present_", "past_")] = value
        feeds["input_ids"][0, 0] = int(outs[0][0, -1].argmax())
        return time.perf_counter() - t0

    return step


def raw_binding_loop(rt) -> callable:
    """decode.onnx through the runtime's double-buffered IOBinding state, argmax only (no Generation)."""
    state = rt.new_state(1)
    tok = np.array([1])

    def step() -> float:
        t0 = time.perf_counter()
        tok[0] = int(state.step(tok).argmax())
        return time.perf_counter() - t0

    return step


def timed_steps(gen) -> callable:
    """``Generation.step()`` of ``gen``; returns the step's own timing (seconds). The first token (sampled from the
    prefill logits, no decode run) is taken here, untimed."""
    if gen.first_token_s is None:
        gen.step()

    def step() -> float:
        gen.step()
        return gen.step_s[-1]

    return step


def stats(samples_ms: list[float]) -> dict:
    a = np.asarray(samples_ms)
    return {"median_ms": float(np.median(a)), "p10_ms": float(np.percentile(a, 10)),
            "p90_ms": float(np.percentile(a, 90)), "n": int(a.size)}


def interleaved(loops: dict, blocks: int, block_steps: int) -> dict:
    """Median of each block of each loop, blocks of the loops alternating."""
    samples = {name: [] for name in loops}
    for _ in range(blocks):
        for name, step in loops.items():
            samples[name].append(float(np.median([step() for _ in range(block_steps)])) * 1e3)
    return {name: stats(s) for name, s in samples.items()}


NEAR = 100  # the position the --far one is compared with


def position_latency(rt, near: int, far: int, blocks: int, block_steps: int) -> dict:
    """Runtime decode ms/step of a sequence at position ``far`` against one at ``near``, stepped in alternating
    blocks (so both see the same machine); positions advance by ``blocks * block_steps`` during the measurement."""
    steps = blocks * block_steps
    far_gen = rt.start([[1]], far + steps + 1)
    while len(far_gen.tokens[0]) < far:  # advance (not measured)
        far_gen.step()
    near_gen = rt.start([[1 + i % 200 for i in range(near)]], steps + 1)
    out = interleaved({"near": timed_steps(near_gen), "far": timed_steps(far_gen)}, blocks, block_steps)
    out["near"]["position"], out["far"]["position"] = near, far
    return out


def main() -> None:
    ap = tool_parser(__doc__)
    ap.add_argument("--threads", type=positive_int, default=2)
    ap.add_argument("--blocks", type=positive_int, default=15)
    ap.add_argument("--block-steps", type=positive_int, default=20)
    ap.add_argument("--far", type=positive_int, default=10_000)
    ap.add_argument("--export", type=Path, help="reuse this mamba-130m-shaped export instead of making one")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.far <= NEAR:
        ap.error(f"--far must be past the near position ({NEAR}), found {args.far}")
    if args.export is not None and not (args.export / "manifest.json").is_file():
        ap.error(f"--export {args.export}: not an export directory (no manifest.json)")
    if args.json is not None and not args.json.parent.is_dir():
        ap.error(f"--json {args.json}: no such directory {args.json.parent}")

    import onnxruntime

    from mamba_runtime import MambaRuntime

    with tempfile.TemporaryDirectory() as tmp:
        out = args.export or make_export(Path(tmp), args)
        rt = MambaRuntime(out, provider="cpu", threads=args.threads, custom_ops="require")
        total = args.blocks * args.block_steps + 10
        loops = {"raw session.run": raw_run_loop(rt), "raw IOBinding": raw_binding_loop(rt),
                 "runtime Generation.step": timed_steps(rt.start([[1, 2, 3]], total + 2))}
        for step in loops.values():  # warm-up
            for _ in range(5):
                step()
        decode = interleaved(loops, args.blocks, args.block_steps)
        position = position_latency(rt, NEAR, args.far, args.blocks, args.block_steps)
        c = rt.info.manifest["config"]
    base = decode["raw session.run"]["median_ms"]
    print(f"\nload average (1 min) at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"d_model {c['d_model']}, {c['n_layer']} layers, vocab {c['vocab_size']}, batch 1, {args.threads} threads, "
          f"CPU ({platform.processor() or platform.machine()})\n")
    print("| decode loop | ms/step median | p10-p90 of block medians | vs raw session.run |")
    print("| --- | --- | --- | --- |")
    for name, s in decode.items():
        print(f"| {name} | {s['median_ms']:.3f} | {s['p10_ms']:.3f}-{s['p90_ms']:.3f} | "
              f"{s['median_ms'] - base:+.3f} ms ({(s['median_ms'] / base - 1) * 100:+.1f}%) |")
    n, f = position["near"], position["far"]
    print(f"\nruntime decode at position {n['position']}: {n['median_ms']:.3f} ms (p10-p90 {n['p10_ms']:.3f}-"
          f"{n['p90_ms']:.3f}); at position {f['position']}: {f['median_ms']:.3f} ms (p10-p90 {f['p10_ms']:.3f}-"
          f"{f['p90_ms']:.3f}); ratio {f['median_ms'] / n['median_ms']:.3f}")
    if args.json:
        args.json.write_text(json.dumps({
            "machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "load_average_1m_at_end": os.getloadavg()[0]},
            "versions": {"onnxruntime": onnxruntime.__version__, "numpy": np.__version__},
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "decode": decode, "position": position}, indent=2))


if __name__ == "__main__":
    main()
