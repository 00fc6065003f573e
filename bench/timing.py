"""Timing shared by the benches: the slowest rank's mean wall-clock seconds per call (distributed), one GPU's
time per call by CUDA events, plainly or captured in a CUDA graph, and the GPU's clock and power over a stretch of time."""
import math
import shutil
import subprocess
import threading
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


def parse_clock_power(line: str) -> tuple[float, float] | None:
    """(SM MHz, board W) from one line of `nvidia-smi --query-gpu=clocks.sm,power.draw --format=csv,noheader,nounits`."""
    try:
        mhz, watts = (float(field) for field in line.split(","))
    except ValueError:  # "[N/A]", a partial line
        return None
    return mhz, watts


class ClockPower:
    """The GPU's SM clock and board power, sampled by nvidia-smi every `period_ms` in the background, so that a timed
    stretch can say whether the card ran at full clock or held at its power limit. No nvidia-smi: every mean is NaN."""

    def __init__(self, device: torch.device, period_ms: int = 100):
        self.samples: list[tuple[float, float, float]] = []  # (time.perf_counter(), MHz, W)
        self.proc = None
        exe = shutil.which("nvidia-smi")
        if exe is None or device.type != "cuda":
            return
        gpu = f"GPU-{torch.cuda.get_device_properties(device).uuid}"  # the CUDA device itself, whatever CUDA_VISIBLE_DEVICES says
        self.proc = subprocess.Popen([exe, "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits", "-lms", str(period_ms), "-i", gpu],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            sample = parse_clock_power(line)
            if sample is not None:
                self.samples.append((time.perf_counter(), *sample))

    def mean(self, t0: float, t1: float) -> tuple[float, float]:
        """(mean SM MHz, mean W) of the samples taken between perf_counter times t0 and t1; NaN where there are none."""
        inside = [(mhz, watts) for t, mhz, watts in list(self.samples) if t0 <= t <= t1]
        if not inside:
            return math.nan, math.nan
        return sum(m for m, _ in inside) / len(inside), sum(w for _, w in inside) / len(inside)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()
