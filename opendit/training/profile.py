"""train.py --profile_steps FIRST-LAST: torch.profiler over those training steps, a Chrome trace and where the time went."""

import json
import os
import time
from typing import Optional

import torch

from opendit.errors import UsageError

HOST_CATEGORIES = ("cpu_op", "user_annotation", "cuda_runtime", "python_function")
STEP_RANGE = "train step "  # each profiled step's named range in the trace


def parse_steps(value: str, max_steps: Optional[int] = None) -> Optional[tuple[int, int]]:
    """'61-65' -> (61, 65), steps counted from 1 as the logs count them; '' -> None."""
    if not value:
        return None
    first, sep, last = value.partition("-")
    if not (sep and first.isdigit() and last.isdigit()) or not 1 <= int(first) <= int(last):
        raise UsageError(f"--profile_steps {value}: expected FIRST-LAST, steps counted from 1 (e.g. 61-65)")
    if max_steps is not None and int(first) > max_steps:
        raise UsageError(f"--profile_steps {value}: starts after --max_steps {max_steps}")
    return int(first), int(last)


def union_spans(intervals) -> list:
    """The union of (start, duration) intervals as sorted, disjoint [start, end] spans."""
    spans: list = []
    for start, dur in sorted(intervals):
        if spans and start <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], start + dur)
        else:
            spans.append([start, start + dur])
    return spans


def busy_us(intervals: list) -> float:
    """Time covered by the union of (start, duration) intervals."""
    return sum(end - start for start, end in union_spans(intervals))


def trace_events(trace_path: str) -> list:
    """The events of an exported Chrome trace."""
    with open(trace_path) as f:
        return json.load(f)["traceEvents"]


def trace_kernels(events: list) -> list:
    """The GPU kernels of a trace's events: (start us, duration us, name, stream), in the trace's order."""
    return [(float(e["ts"]), float(e["dur"]), e.get("name", ""), e.get("args", {}).get("stream")) for e in events if e.get("cat") == "kernel" and "dur" in e]


def trace_host_ranges(events: list) -> list:
    """The host's ranges of a trace's events (operators, annotations, CUDA runtime calls): (start us, duration us, name)."""
    return [(float(e["ts"]), float(e["dur"]), e.get("name", "")) for e in events if e.get("cat") in HOST_CATEGORIES and "dur" in e]


def idle_gaps(kernels: list, host: list, top: int = 5) -> list:
    """The `top` longest stretches with no kernel running: (start us, length us, the step, what the host was doing
    halfway through, which is what kept the next kernel from being launched)."""
    spans = union_spans((s, d) for s, d, _, _ in kernels)
    gaps = [(before[1], after[0] - before[1]) for before, after in zip(spans, spans[1:])]
    found = []
    for start, length in sorted(gaps, key=lambda g: -g[1])[:top]:
        middle = start + length / 2
        around = sorted((r for r in host if r[0] <= middle < r[0] + r[1]), key=lambda r: -r[1])  # outermost first
        steps = [name for _, _, name in around if name.startswith(STEP_RANGE)]
        doing = [name for _, _, name in around if not name.startswith(STEP_RANGE)]
        found.append((start, length, steps[0][len(STEP_RANGE):] if steps else "between steps", " > ".join(doing[:3]) or "no recorded operation"))
    return found


def summarize(trace_path: str, wall_s: float, steps: int, host_table: str) -> tuple[str, str]:
    """(summary.md's text, one log line) from the exported trace: the GPU's busy share of the window, the top kernels,
    the longest stretches where the GPU waited and what the host was doing then."""
    events = trace_events(trace_path)
    kernels = trace_kernels(events)
    lines = [f"# Steps profiled: {steps}, {1e3 * wall_s / steps:.2f} ms a step on the host clock (profiler overhead included)", ""]
    if kernels:
        busy = busy_us([(s, d) for s, d, _, _ in kernels]) / 1e3
        line = f"GPU busy {busy / steps:.2f} ms a step, {100 * busy / (1e3 * wall_s):.1f}% of the window"
        lines += [line + " (the rest: the GPU waited for the host)", "", "| kernel (top 20 by GPU time) | calls a step | ms a step |", "|---|---:|---:|"]
        by_name: dict = {}
        for _, dur, name, _ in kernels:
            n, total = by_name.get(name, (0, 0.0))
            by_name[name] = (n + 1, total + dur)
        for name, (n, total) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:20]:
            lines.append(f"| {name[:110]} | {n / steps:.0f} | {total / steps / 1e3:.3f} |")
        origin = min(s for s, _, _, _ in kernels)
        lines += ["", "## The GPU's longest waits", "", "| at ms | idle ms | in step | the host was in (outermost first) |", "|---:|---:|---|---|"]
        for start, length, step, doing in idle_gaps(kernels, trace_host_ranges(events)):
            lines.append(f"| {(start - origin) / 1e3:.1f} | {length / 1e3:.2f} | {step} | {doing[:160]} |")
    else:
        line = "no GPU kernels recorded (a CPU run): host operations only"
        lines.append(line)
    lines += ["", "## Host operations (top 20 by self time)", "", "```", host_table, "```"]
    return "\n".join(lines) + "\n", line


class StepProfiler:
    """Profiles steps FIRST..LAST of this process and writes trace.json (chrome://tracing, Perfetto) and summary.md."""

    def __init__(self, steps: tuple[int, int], max_steps: int, out_dir: str, device: torch.device, logger):
        self.first, self.last = steps[0], min(steps[1], max_steps)  # a run that ends first still writes its files
        self.out_dir, self.device, self.logger = out_dir, device, logger
        self.prof, self.start, self.step_range = None, 0.0, None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def before(self, step: int) -> None:
        """Called before step `step` (counted from 1) runs."""
        if step == self.first:
            self._sync()
            activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self.prof = torch.profiler.profile(activities=activities)
            self.prof.__enter__()
            self.start = time.perf_counter()
        if self.prof is not None:  # each step a named range: the trace's waits are placed by step
            self.step_range = torch.profiler.record_function(f"{STEP_RANGE}{step}")
            self.step_range.__enter__()

    def after(self, step: int) -> None:
        """Called once step `step` has run; the last profiled step writes the files."""
        if self.step_range is not None:
            self.step_range.__exit__(None, None, None)
            self.step_range = None
        if self.prof is None or step != self.last:
            return
        self._sync()
        wall_s = time.perf_counter() - self.start
        self.prof.__exit__(None, None, None)
        os.makedirs(self.out_dir, exist_ok=True)
        trace = os.path.join(self.out_dir, "trace.json")
        self.prof.export_chrome_trace(trace)
        host_table = self.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
        text, line = summarize(trace, wall_s, self.last - self.first + 1, host_table)
        with open(os.path.join(self.out_dir, "summary.md"), "w") as f:
            f.write(text)
        self.logger.info(f"Profiled steps {self.first}-{self.last}: {line}; {self.out_dir}/summary.md and trace.json")
        self.prof = None
