"""Training metrics: metrics.jsonl and TensorBoard on rank 0, and the peak FLOP/s that MFU is measured against."""
import argparse
import json
import math
import os
import time
from typing import Optional

import torch

from opendit.parallel.process import all_reduce_mean


def peak_tflops(args: argparse.Namespace, device: torch.device) -> Optional[float]:
    """--peak_tflops, else the dense bf16/fp16 peak of an H100/H200 (989 TFLOP/s), else None (no MFU)."""
    if args.peak_tflops:
        return args.peak_tflops
    if device.type == "cuda" and args.mixed_precision != "fp32" and any(gpu in torch.cuda.get_device_name(device) for gpu in ("H100", "H200")):
        return 989.0
    return None


def strict(record: dict) -> dict:
    """NaN and infinities (a diverged step) become null, so every line stays strict JSON."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


def drop_after(path: str, step: int) -> None:
    """Rewrite metrics.jsonl without the records of steps after `step` (and any unreadable, torn last line)."""
    if not os.path.isfile(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                continue
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


class MetricsWriter:
    """metrics.jsonl (always) and TensorBoard scalars (when tensorboard is installed), rank 0 only."""

    def __init__(self, experiment_dir: str, enabled: bool, resumed_step: int = 0):
        self.enabled = enabled
        self.tb = None
        if enabled:
            path = os.path.join(experiment_dir, "metrics.jsonl")
            drop_after(path, resumed_step)  # steps after the checkpoint are recomputed: no duplicate records
            self.file = open(path, "a")
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(experiment_dir, "tensorboard"))
            except Exception:  # tensorboard is optional
                self.tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(strict(record), allow_nan=False) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


class Meter:
    """Loss sums and timing between two log lines; record() turns them into one metrics.jsonl line."""

    def __init__(self, device: torch.device, images_per_step: int, world_size: int, flops_per_image: int, peak: Optional[float]):
        self.device, self.images_per_step, self.world_size = device, images_per_step, world_size
        self.flops_per_image, self.peak = flops_per_image, peak
        self.sums = torch.zeros(3, device=device)  # loss, mse, vb
        self.steps, self.start = 0, time.time()

    def add(self, loss_dict: dict) -> None:
        """Accumulate a step's losses on the device (no host sync)."""
        vb = loss_dict.get("vb", torch.zeros_like(loss_dict["mse"]))
        self.sums += torch.stack([loss_dict["loss"].mean().detach(), loss_dict["mse"].mean().detach(), vb.mean().detach()])
        self.steps += 1

    def record(self, step: int, epoch: int, grad_norm: torch.Tensor, lr: float) -> dict:
        """The averages over all ranks since the last record, speed and memory; then starts a new interval."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.time() - self.start
        loss, mse, vb = all_reduce_mean(self.sums / self.steps).tolist()
        record = {"step": step, "epoch": epoch, "loss": loss, "mse": mse, "vb": vb, "grad_norm": float(grad_norm), "steps_per_sec": self.steps / elapsed}
        record["images_per_sec"] = self.steps * self.images_per_step / elapsed
        record["lr"] = lr
        record["images_per_sec_per_gpu"] = record["images_per_sec"] / self.world_size
        if self.peak:
            record["mfu"] = self.flops_per_image * record["images_per_sec_per_gpu"] / (self.peak * 1e12)
        if self.device.type == "cuda":
            record["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self.sums.zero_()
        self.steps, self.start = 0, time.time()
        return record


def log_line(record: dict) -> str:
    """(step=0000100) loss: 0.1234, steps/s: 1.00, images/s: 32.0[, MFU: 50.0%][, peak mem: 10.0 GiB]"""
    line = f"(step={record['step']:07d}) loss: {record['loss']:.4f}, steps/s: {record['steps_per_sec']:.2f}, images/s: {record['images_per_sec']:.1f}"
    if "mfu" in record:
        line += f", MFU: {100 * record['mfu']:.1f}%"
    if "peak_mem_gib" in record:
        line += f", peak mem: {record['peak_mem_gib']:.1f} GiB"
    return line
