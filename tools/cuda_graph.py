"""CUDA graph capture shared by the GPU benchmarks (tools/bench_gpu.py, tools/bench_scan.py)."""

from __future__ import annotations

from typing import Callable

import torch


def capture(fn: Callable[[], object], warmup: int = 3) -> torch.cuda.CUDAGraph:
    """``fn`` captured in a CUDA graph, after ``warmup`` calls on a side stream (torch's capture recipe: the caching
    allocator and any lazily initialised state settle outside the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph
