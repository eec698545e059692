"""Latency measurements of the runtime (used by ``mamba-export profile``; numpy and onnxruntime only).

Every function measures with the runtime's own code path (prefill per prompt, then :meth:`Generation.step`, greedy),
so the numbers are what a user of :class:`~mamba_runtime.MambaRuntime` gets. Times are wall-clock
(``time.perf_counter``); "decode ms/step" is one step of the whole batch, "tokens/s" counts every sequence's token.

The memory floor of a decode step of a batch is the bytes it must move (:func:`decode_bytes_per_step`: the weights,
read once whatever the batch, and per sequence its embedding row, its recurrent state read and written, its logits
written) divided by the machine's measured read bandwidth (:func:`read_bandwidth_gbs`; on CUDA the device's copy
bandwidth, :func:`device_bandwidth_gbs`); achieved GB/s is those bytes over the measured step time.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .manifest import ExportInfo
from .sessions import open_session, session_options

Tick = Callable[[int], None]
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def summary_ms(seconds: list[float]) -> dict:
    """Median, p90, p99, mean, min and count of a list of durations in seconds, in milliseconds. Latency is read
    from the percentiles; throughput (tokens/s) from the mean, which counts the slow steps too."""
    ms = np.asarray(seconds) * 1e3
    return {"p50_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()), "min_ms": float(ms.min()),
            "n": int(ms.size)}


def machine_info() -> dict:
    """CPU model, core count, memory, load and library versions, to be written next to the numbers."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
    from mamba_export import __version__

    return {"platform": platform.platform(), "cpu": cpu, "cpus": os.cpu_count(), "memory_bytes": mem,
            "load_average_1m": os.getloadavg()[0],  # other work on the machine skews every number
            "versions": {"python": platform.python_version(), "numpy": np.__version__, "onnxruntime": ort.__version__,
                         "mamba_export": __version__}}


def read_bandwidth_gbs(threads: int, gib: float = 0.5, repeats: int = 5) -> float:
    """Memory read bandwidth: ``threads`` threads each summing its slice of a ``gib`` GiB array; best of ``repeats``."""
    a = np.ones(int(gib * 2**30) // 8, dtype=np.float64)
    parts = np.array_split(a, threads)
    best = float("inf")
    for _ in range(repeats):
        workers = [threading.Thread(target=np.add.reduce, args=(p,)) for p in parts]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - t0)
    return a.nbytes / best / 1e9


def device_bandwidth_gbs(gib: float = 0.5, repeats: int = 5) -> float:
    """CUDA device memory bandwidth (CuPy): bytes read plus bytes written by a device-to-device copy of ``gib`` GiB,
    timed with CUDA events, best of ``repeats`` after one warm-up copy (tools/bench_gpu.py measures the same
    quantity with torch: the median of 20 copies of 1 GiB)."""
    import cupy as cp

    a = cp.ones(int(gib * 2**30) // 4, dtype=cp.float32)
    b = cp.empty_like(a)
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    cp.copyto(b, a)
    best = float("inf")
    for _ in range(repeats):
        start.record()
        cp.copyto(b, a)
        stop.record()
        stop.synchronize()
        best = min(best, cp.cuda.get_elapsed_time(start, stop) / 1e3)
    return 2 * a.nbytes / best / 1e9


def weight_bytes_per_token(info: ExportInfo, library: bool = True) -> int:
    """Bytes of weights one decode step reads: every layer's parameters, the final norm, the LM head, one embedding
    row. in_proj, out_proj, embedding and head are in the export dtype (the in_proj, out_proj and head matrices in
    the manifest's ``decode_weight_dtype`` when it is float16 or int8, int8 with a float32 scale per output row, and
    the custom-op library runs them: without it, ``library=False``, their functions multiply float32 copies that
    onnxruntime folds at session creation); the rest enters DecodeStep as float32."""
    c = info.manifest["config"]
    t = _DTYPE_BYTES[info.dtype]
    narrow = info.manifest.get("decode_weight_dtype") if library else None
    m = {"float16": 2, "int8": 1}.get(narrow, t)  # the three matrices of decode.onnx
    scales = 4 if narrow == "int8" else 0  # a float32 scale per output row of each of them
    D, E, N, K, R, V = c["d_model"], c["d_inner"], c["d_state"], c["d_conv"], c["dt_rank"], c["vocab_size"]
    bias = t * (2 * E + D) if c.get("bias") else 0
    big = m * (D * 2 * E + E * D) + scales * (2 * E + D) + bias  # in_proj, out_proj
    small = 4 * (E * K + E + E * (R + 2 * N) + R * E + E + E * N + E) + t * D  # conv, x/dt_proj, A, D, norm
    return c["n_layer"] * (big + small) + m * V * D + scales * V + t * (D + D)  # head, final norm, an embedding row


def sequence_bytes_per_step(info: ExportInfo) -> int:
    """Bytes a decode step moves for each sequence of the batch: its embedding row, its float32 conv and SSM states
    of every layer read and written, its float32 logits written and its int64 token id read."""
    c = info.manifest["config"]
    state = 4 * c["n_layer"] * c["d_inner"] * (c["d_conv"] - 1 + c["d_state"])
    return _DTYPE_BYTES[info.dtype] * c["d_model"] + 2 * state + 4 * c["vocab_size"] + 8


def decode_bytes_per_step(info: ExportInfo, batch: int, library: bool = True) -> int:
    """Bytes one decode step of ``batch`` sequences must move: the weights, once (:func:`weight_bytes_per_token`
    without the embedding row it counts), and :func:`sequence_bytes_per_step` per sequence. At batch 32 of a small
    model the states are more bytes than the weights, so a floor of the weights alone would flatter large batches."""
    row = _DTYPE_BYTES[info.dtype] * info.manifest["config"]["d_model"]
    return weight_bytes_per_token(info, library) - row + batch * sequence_bytes_per_step(info)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def random_prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    return np.random.default_rng(seed).integers(0, vocab, (batch, length)).tolist()


def measure_warmup(rt, prompt_len: int) -> float:
    """Seconds of the first prefill and decode steps (onnxruntime's first-run allocations), reported apart."""
    t0 = time.perf_counter()
    gen = rt.start(random_prompts(1, prompt_len, rt.info.vocab_size, seed=99), 4)
    gen.run()
    return time.perf_counter() - t0


def measure_prefill(rt, batch: int, prompt_len: int, repeats: int, tick: Tick | None = None) -> dict:
    """Time to first token (prefill of ``batch`` prompts + the first greedy step) and prefill tokens/s."""
    ttft, prefill = [], []
    for r in range(repeats):
        gen = rt.start(random_prompts(batch, prompt_len, rt.info.vocab_size, seed=r), 1)
        gen.step()
        ttft.append(gen.first_token_s)
        prefill.append(gen.prefill_s)
        if tick:
            tick(1)
    p = summary_ms(prefill)
    return {"ttft": summary_ms(ttft), "prefill": p, "prefill_tokens_per_s": batch * prompt_len / p["mean_ms"] * 1e3}


def measure_decode(rt, batch: int, prompt_len: int, steps: int, step_bytes: int, tick: Tick | None = None) -> dict:
    """Decode ``steps`` steps of a batch: ms/step percentiles, tokens/s, and the achieved GB/s of ``step_bytes``
    (:func:`decode_bytes_per_step`) moved a step."""
    gen = rt.start(random_prompts(batch, prompt_len, rt.info.vocab_size), steps + 1)
    gen.step()
    for _ in range(steps):
        gen.step()
        if tick:
            tick(1)
    s = summary_ms(gen.step_s)
    return {"decode": s, "tokens_per_s": batch / s["mean_ms"] * 1e3, "bytes_per_step": step_bytes,
            "achieved_GBps": step_bytes / s["p50_ms"] / 1e6}


def latency_vs_position(rt, tokens: int, windows: int = 20, tick: Tick | None = None) -> dict:
    """Decode ``tokens`` steps of one sequence; median ms/step per window of positions, and last/first window."""
    gen = rt.start([[1]], tokens + 1)
    gen.step()
    for i in range(tokens):
        gen.step()
        if tick and i % 100 == 99:
            tick(100)
    ms = np.asarray(gen.step_s) * 1e3
    windows = max(1, min(windows, ms.size))  # no empty window when fewer tokens than windows
    edges = np.linspace(0, ms.size, windows + 1).astype(int)
    rows = [{"position": int(a) + 1, "p50_ms": float(np.median(ms[a:b])), "p90_ms": float(np.percentile(ms[a:b], 90))}
            for a, b in zip(edges[:-1], edges[1:])]
    return {"tokens": tokens, "windows": rows, "last_over_first": rows[-1]["p50_ms"] / rows[0]["p50_ms"]}


def top_operators(rt, batch: int, steps: int, top: int = 10, warmup: int = 5) -> dict:
    """onnxruntime's own profiler over ``steps`` decode steps of decode.onnx, after ``warmup`` unprofiled-in-effect
    steps (their events are dropped: first-run allocations). Per operator type: the median over the steps of its
    time in a step, its share of ``kernel_ms`` (the sum of those medians: the nodes' kernels, without onnxruntime's own
    time between them) and calls a step; the ``top`` largest, then one row for the rest. ``step_ms``: the median
    profiled step, which per-node timing makes slower than an unprofiled one (the decode table)."""
    with tempfile.TemporaryDirectory() as tmp:
        so = session_options(rt.threads, rt.custom_op_library, profile_prefix=str(Path(tmp) / "ort"),
                             config=rt.ort_config)
        session = open_session(rt.info.path / "decode.onnx", so, rt.device.providers())
        feeds = {"input_ids": np.ones((batch, 1), dtype=np.int64)}
        conv, ssm = rt.info.state_shapes(batch)
        for i in range(rt.info.n_layer):
            feeds[f"past_conv.{i}"] = np.zeros(conv, np.float32)
            feeds[f"past_ssm.{i}"] = np.zeros(ssm, np.float32)
        for _ in range(warmup + steps):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[warmup:]
    per_op: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(len(runs)))
    calls: dict[str, int] = defaultdict(int)
    starts = np.array([a for a, _ in runs])
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            k = int(np.searchsorted(starts, e["ts"], side="right")) - 1
            if k < 0 or e["ts"] > runs[k][1]:
                continue  # a warm-up step's node
            op = e.get("args", {}).get("op_name", "?")
            per_op[op][k] += e["dur"] / 1e3
            calls[op] += 1
    medians = {op: float(np.median(ms)) for op, ms in per_op.items()}
    total = sum(medians.values()) or 1.0
    ranked = sorted(medians.items(), key=lambda kv: -kv[1])
    n = max(len(runs), 1)
    ops = [{"op": op, "ms_per_step": ms, "share": ms / total, "calls_per_step": calls[op] // n}
           for op, ms in ranked[:top]]
    if len(ranked) > top:  # the rest in one row, so that the shares add up to 1
        rest = ranked[top:]
        ms = sum(m for _, m in rest)
        ops.append({"op": f"other ({len(rest)} types)", "ms_per_step": ms, "share": ms / total,
                    "calls_per_step": sum(calls[op] for op, _ in rest) // n})
    return {"steps": len(runs), "warmup_steps": warmup,
            "step_ms": float(np.median([(b - a) / 1e3 for a, b in runs])) if runs else None,
            "kernel_ms": total if per_op else 0.0, "ops": ops}
