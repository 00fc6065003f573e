"""The training benchmarks run end to end on the CPU (--tiny): every row timed, unknown names refused in one line."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), *args], capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_train_step_times_each_variant_and_its_modifiers():
    variants = "flash,kernels+per-layer-mods+fp32-biases+bf16res+triton-boundaries"
    out = bench("train_step.py", "--tiny", "--model", "DiT-S/2", "--batch_sizes", "2", "--variants", variants)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split("|") for line in out.stdout.splitlines() if line.startswith("| ") and "| 2 |" in line]
    assert [r[1].strip() for r in rows] == variants.split(",")
    assert all(float(r[3]) > 0 for r in rows), out.stdout  # img/s measured, not "failed" or "OOM"


def test_train_step_refuses_an_unknown_modifier_in_one_line():
    out = bench("train_step.py", "--tiny", "--variants", "flash+no-such-thing")
    assert out.returncode != 0 and "unknown variant part(s) ['no-such-thing']" in out.stderr
    assert "Traceback" not in out.stderr


def test_kernel_owners_runs_and_refuses_graph_variants():
    out = bench("kernel_owners.py", "--tiny", "--model", "DiT-S/2", "--variant", "step+bf16res")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| kernels per step | us per call | kernel | launched by (innermost first) |" in out.stdout
    out = bench("kernel_owners.py", "--tiny", "--variant", "graph")
    assert out.returncode != 0 and "--variant graph: a CUDA-graph replay" in out.stderr and "Traceback" not in out.stderr


def test_clock_power_reads_nvidia_smi_lines_and_averages_a_window():
    import math

    import torch

    from bench.timing import ClockPower, parse_clock_power

    assert parse_clock_power("1530, 695.12\n") == (1530.0, 695.12)
    assert parse_clock_power("[N/A], [N/A]\n") is None and parse_clock_power("15") is None
    monitor = ClockPower(torch.device("cpu"))  # no GPU: nothing sampled
    assert monitor.proc is None and all(math.isnan(v) for v in monitor.mean(0.0, 1e9))
    monitor.samples = [(1.0, 1980.0, 120.0), (2.0, 1500.0, 700.0), (3.0, 1520.0, 690.0), (4.0, 1980.0, 130.0)]
    assert monitor.mean(1.5, 3.5) == (1510.0, 695.0)  # only the samples inside the window
    monitor.close()


def test_loader_host_times_train_py_loader_per_sharing_strategy():
    out = bench("loader_host.py", "--workers", "1", "--batches", "8", "--warmup", "2", "--batch_size", "16", "--handshake_batches", "4")
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split("|") for line in out.stdout.splitlines() if line.startswith("| file_")]
    assert [r[1].strip() for r in rows] == ["file_descriptor", "file_system"] * 2, out.stdout  # the loader, then the hand-over
    assert all(float(r[2]) > 0 for r in rows) and all(float(r[3]) > 0 for r in rows), out.stdout
