"""Attention broadcast (Pyramid Attention Broadcast, Zhao et al. 2024) for the video models, applied from outside.

In the stable middle of the schedule an attention's output changes little from one step to the next: inside a step
range each attention computes its output (after proj) at one step and hands the same tensor back for the next
every - 1 steps. Latte's temporal attention is steadier than its spatial one and gets a wider range and a longer
period; VDiT / vDiT blocks attend over all tokens at once and count as spatial. Outside the ranges every step computes.
Optionally (off by default) each block's MLP output is broadcast the same way in its own range, as PAB's implementation
allows for the steadiest steps. The denoising loop tells the broadcaster the step (set_step) before each forward;
the model files know nothing of it.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn

from opendit.errors import UsageError

SPATIAL, TEMPORAL, MLP = "spatial", "temporal", "mlp"


@dataclass(frozen=True)
class BroadcastConfig:
    """Step ranges as fractions [start, end) of the schedule and reuse periods: spatial and temporal attention, MLPs."""

    spatial_range: Tuple[float, float] = (0.2, 0.8)
    temporal_range: Tuple[float, float] = (0.1, 0.9)
    spatial_every: int = 2
    temporal_every: int = 4
    mlp_range: Tuple[float, float] = (0.0, 0.0)  # empty: every MLP computes at every step
    mlp_every: int = 2


class CachedOutput:
    """Wraps one Attention's (or Mlp's) forward: computes, or returns the output it computed at most every - 1 steps ago."""

    def __init__(self, broadcaster: "AttentionBroadcast", module: nn.Module, kind: str):
        self.b, self.kind, self.forward = broadcaster, kind, module.forward
        self.out: Optional[torch.Tensor] = None
        self.at, self.key = -1, None  # the step self.out was computed at, and its input's (shape, dtype, device)

    @torch.compiler.disable  # a compiled block breaks its graph here (no recompile per step): the choice is made on the host
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b = self.b
        if not b.in_range(self.kind):
            self.out = None
            b.computed += 1
            return self.forward(x)
        key = (x.shape, x.dtype, x.device)  # the cached output fits only inputs like the one it was computed from
        if self.out is not None and b.step - self.at < b.every(self.kind) and self.key == key:
            b.reused += 1
            return self.out
        self.out, self.at, self.key = self.forward(x), b.step, key
        b.computed += 1
        return self.out


class AttentionBroadcast:
    """Attach to a video model's block attentions (and MLPs); set_step(i, total) before each forward of the denoising loop."""

    def __init__(self, config: BroadcastConfig):
        self.config = config
        c = config
        self.rules = {SPATIAL: (c.spatial_range, c.spatial_every), TEMPORAL: (c.temporal_range, c.temporal_every), MLP: (c.mlp_range, c.mlp_every)}
        self.step, self.total = 0, 1
        self.computed = self.reused = 0  # wrapped forwards run / skipped, for tests and the bench
        self.wrapped: list = []

    def attach(self, model: nn.Module) -> "AttentionBroadcast":
        """Wrap every block's attention, and MLP when it has a range (again after another broadcaster took them over;
        a no-op when already ours)."""
        if self.wrapped and all(m.__dict__.get("forward") is w for m, w in self.wrapped):
            return self
        self.wrapped = []
        lo, hi = self.config.mlp_range
        for block in model.blocks:
            kind = getattr(block, "kind", SPATIAL)  # Latte blocks say which; VDiT attends over all tokens
            for module, k in [(block.attn, kind)] + ([(block.mlp, MLP)] if hi > lo else []):
                if isinstance(module.__dict__.get("forward"), CachedOutput):
                    del module.forward  # another broadcaster's wrapper
                wrapper = CachedOutput(self, module, k)
                module.forward = wrapper  # an instance attribute: parameters and state dict are untouched
                self.wrapped.append((module, wrapper))
        return self

    def detach(self) -> None:
        """Give every attention its own forward back."""
        for module, wrapper in self.wrapped:
            if module.__dict__.get("forward") is wrapper:
                del module.forward
        self.wrapped = []

    def set_step(self, step: int, total: int) -> None:
        """The loop is at step (0-based) of total; step 0 starts a new sample and drops every cached output."""
        self.step, self.total = step, total
        if step == 0:
            for _, wrapper in self.wrapped:
                wrapper.out = None

    def every(self, kind: str) -> int:
        return self.rules[kind][1]

    def in_range(self, kind: str) -> bool:
        (lo, hi), _ = self.rules[kind]
        return lo * self.total <= self.step < hi * self.total


def parse_range(text: str, flag: str) -> Tuple[float, float]:
    """'0.2,0.8' -> (0.2, 0.8); a one-line error unless 0 <= start <= end <= 1."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"{flag} {text}: expected START,END as fractions of the schedule, e.g. 0.2,0.8") from None
    if not 0 <= lo <= hi <= 1:
        raise UsageError(f"{flag} {text}: need 0 <= START <= END <= 1")
    return lo, hi


def config_from_args(args) -> BroadcastConfig:
    """The broadcast flags of sample.py as a BroadcastConfig (one-line errors for bad values)."""
    mlp_every = getattr(args, "broadcast_mlp_every", 2)
    if args.broadcast_every < 1 or args.broadcast_every_temporal < 1 or mlp_every < 1:
        raise UsageError("--broadcast_every, --broadcast_every_temporal and --broadcast_mlp_every must be at least 1")
    return BroadcastConfig(parse_range(args.broadcast_range, "--broadcast_range"), parse_range(args.broadcast_range_temporal, "--broadcast_range_temporal"),
                           args.broadcast_every, args.broadcast_every_temporal, parse_range(getattr(args, "broadcast_mlp_range", "0,0"), "--broadcast_mlp_range"), mlp_every)
