"""Wall-clock timing shared by the distributed benches: the slowest rank's mean seconds per call."""
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
