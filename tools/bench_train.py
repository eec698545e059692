"""Time `mamba-export train`'s optimiser step on a GPU: eager against CUDA graph replays, in the same run.

For each preset: the model built as the train command builds it, random byte batches of the preset's shape, the
step function the train command uses (mamba_export.training.loop._step_runner with --cuda-graph off and on), 20
warm-up steps, then ROUNDS rounds of STEPS steps; each step returns its loss and gradient norm to the host, as in
training. Prints ms a step (median and p10-p90 over the rounds), tokens a second, the eager / graph ratio, and a
matmul floor: 6 x parameters x tokens FLOPs at the bf16 matmul rate measured here (an 8192^3 torch.mm).

    PYTHONPATH=$PWD:$PWD/kernels python3 tools/bench_train.py [--presets kjv-byte,kjv-byte-small] [--backend triton]
"""

from __future__ import annotations

import statistics
import time

import torch

from tool_args import parser as tool_parser, require_cuda
from mamba_export.training.loop import TrainOptions, _step_runner, build_model, build_optimizer
from mamba_export.training.presets import get_preset


def matmul_rate() -> float:
    """bf16 FLOP/s of a large square torch.mm on this GPU (median of 20)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e-3)
    return 2 * 8192 ** 3 / statistics.median(times)


def time_steps(preset: str, backend: str, mode: str, rounds: int, steps: int) -> tuple[list[float], int]:
    """ms a step of each round, and the parameter count."""
    p = get_preset(preset)
    model = build_model(256, p, backend).cuda().train()
    opt = build_optimizer(model, p)
    opts = TrainOptions(data="", out="", preset=preset, backend=backend, device="cuda", cuda_graph=mode)
    step = _step_runner(model, opt, p, opts, print)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (p.batch_size, p.seq_len + 1), generator=g).cuda() for _ in range(8)]
    for i in range(20):
        w = batches[i % 8]
        step(w[:, :-1], w[:, 1:], p.lr)
    per_round = []
    for r in range(rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(steps):
            w = batches[i % 8]
            step(w[:, :-1], w[:, 1:], p.lr)
        torch.cuda.synchronize()
        per_round.append((time.perf_counter() - t0) * 1e3 / steps)
    params = sum(t.numel() for t in {id(t): t for t in model.parameters()}.values())
    return per_round, params


def main() -> None:
    ap = tool_parser(__doc__)
    ap.add_argument("--presets", default="kjv-byte,kjv-byte-small")
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=50, help="steps a round")
    args = ap.parse_args()
    require_cuda("bench_train")
    props = torch.cuda.get_device_properties(0)
    rate = matmul_rate()
    print(f"card: {props.name}; torch {torch.__version__}; bf16 matmul {rate / 1e12:.0f} TFLOP/s measured")
    print("preset          backend  mode   ms/step (p10-p90)        tokens/s  matmul floor ms  x floor  eager/graph")
    for preset in args.presets.split(","):
        p = get_preset(preset)
        tokens = p.batch_size * p.seq_len
        res = {}
        for mode in ("off", "on"):
            per_round, params = time_steps(preset, args.backend, mode, args.rounds, args.steps)
            q = statistics.quantiles(per_round, n=10)
            res[mode] = statistics.median(per_round)
            floor = 6 * params * tokens / rate * 1e3
            ratio = f"{res['off'] / res['on']:.2f}" if mode == "on" else "-"
            print(f"{preset:15s} {args.backend:8s} {'graph' if mode == 'on' else 'eager':6s} {res[mode]:8.3f} "
                  f"({q[0]:.3f}-{q[-1]:.3f})  {tokens / res[mode] * 1e3:12.0f}  {floor:15.4f}  "
                  f"{res[mode] / floor:7.0f}  {ratio}")


if __name__ == "__main__":
    main()
