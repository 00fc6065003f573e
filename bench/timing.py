"""Timing shared by the benches: the slowest rank's mean wall-clock seconds per call (distributed), and one GPU's
time per call by CUDA events, plainly or captured in a CUDA graph."""
import time

import torch
import torch.distributed as dist


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, iters: int, device: torch.device, group=None, warmup: int = 2) -> float:
    """Mean seconds of fn() over iters calls after warmup, the slowest rank of group (None: this rank alone)."""
    for _ in range(warmup):
        fn()
    sync(device)
    if group is not None:
        dist.barrier(group)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    elapsed = torch.tensor((time.perf_counter() - start) / iters, dtype=torch.float64, device=device)
    if group is not None:
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=group)
    return elapsed.item()


def timed_us(fn, iters: int = 50) -> float:
    """Microseconds per call of fn on the current CUDA stream (CUDA events), after 5 untimed calls."""
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / iters


def graphed_us(fn, iters: int = 20) -> float:
    """Microseconds per call of fn captured iters times in one CUDA graph: the GPU's time, without Python's launch cost."""
    for _ in range(3):
        fn()  # compile / autotune outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    return timed_us(graph.replay, iters=10) / iters
