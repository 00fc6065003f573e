"""Attention broadcast (Pyramid Attention Broadcast, Zhao et al. 2024) for the video models, applied from outside.

In the stable middle of the schedule an attention's output changes little from one step to the next: inside a step
range each attention computes its output (after proj) at one step and hands the same tensor back for the next
every - 1 steps. Latte's temporal attention is steadier than its spatial one and gets a wider range and a longer
period; VDiT / vDiT blocks attend over all tokens at once and count as spatial. Outside the ranges every step computes.
Optionally (off by default) each block's MLP output is broadcast the same way in its own range, as PAB's implementation
allows for the steadiest steps. The denoising loop tells the broadcaster the step (set_step) before each forward;
the model files know nothing of it. Which kinds compute or reuse at each step is a plan fixed by the schedule (plan), so
the engine can capture one CUDA graph per distinct step pattern; the cached outputs then stay in fixed buffers.
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


FULL, COMPUTE, REUSE = "full", "compute", "reuse"  # a kind's state at one step: outside its range, or inside it


class CachedOutput:
    """Wraps one Attention's (or Mlp's) forward: computes, or returns the output it computed at most every - 1 steps ago."""

    def __init__(self, broadcaster: "AttentionBroadcast", module: nn.Module, kind: str):
        self.b, self.kind, self.forward = broadcaster, kind, module.forward
        self.out: Optional[torch.Tensor] = None
        self.key = None  # the (shape, dtype, device) of the input self.out was computed from

    @torch.compiler.disable  # a compiled block breaks its graph here (no recompile per step): the choice is made on the host
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b, state = self.b, self.b.state[self.kind]
        key = (x.shape, x.dtype, x.device)  # the cached output fits only inputs like the one it was computed from
        if state == REUSE and self.out is not None and self.key == key:
            b.reused += 1
            return self.out
        y = self.forward(x)
        b.computed += 1
        if state == FULL:
            if not b.static:
                self.out = None  # outside the range: nothing to keep
        elif b.static and self.out is not None and self.key == key:
            self.out.copy_(y)  # a CUDA graph reads the cached output at this address
        else:
            self.out, self.key = (y.clone() if b.static else y), key
        return y


class AttentionBroadcast:
    """Attach to a video model's block attentions (and MLPs); set_step(i, total) before each forward of the denoising
    loop. static=True (CUDA graphs) keeps each cached output in one buffer, refilled in place."""

    def __init__(self, config: BroadcastConfig, static: bool = False):
        self.config, self.static = config, static
        c = config
        self.rules = {SPATIAL: (c.spatial_range, c.spatial_every), TEMPORAL: (c.temporal_range, c.temporal_every), MLP: (c.mlp_range, c.mlp_every)}
        self.state = {kind: FULL for kind in self.rules}  # this step's state per kind
        self.computed = self.reused = 0  # wrapped forwards run / skipped, for tests and the bench
        self.wrapped: list = []
        self._plans: dict = {}

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

    def detach(self) -> list:
        """Give every attention its own forward back. -> the wrappers (a CUDA graph keeps them for their buffers)."""
        wrapped, self.wrapped = self.wrapped, []
        for module, wrapper in wrapped:
            if module.__dict__.get("forward") is wrapper:
                del module.forward
        return [w for _, w in wrapped]

    def plan(self, total: int) -> list:
        """Each step's state per kind over a schedule of total steps: FULL outside the kind's range; inside it COMPUTE at
        the range's first step and every `every` steps after, REUSE in between."""
        if total not in self._plans:
            rows, at = [], {kind: None for kind in self.rules}
            for i in range(total):
                row = {}
                for kind, ((lo, hi), every) in self.rules.items():
                    if not lo * total <= i < hi * total:
                        row[kind], at[kind] = FULL, None
                    elif at[kind] is not None and i - at[kind] < every:
                        row[kind] = REUSE
                    else:
                        row[kind], at[kind] = COMPUTE, i
                rows.append(row)
            self._plans[total] = rows
        return self._plans[total]

    def set_step(self, step: int, total: int) -> None:
        """The loop is at step (0-based) of total; step 0 starts a new sample and drops every cached output."""
        self.state = self.plan(total)[step]
        if step == 0 and not self.static:
            for _, wrapper in self.wrapped:
                wrapper.out = None

    def tally(self, state: dict, wrappers: list) -> None:
        """Count a graph replay's forwards as the wrappers would have counted them."""
        for w in wrappers:
            if state[w.kind] == REUSE:
                self.reused += 1
            else:
                self.computed += 1


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
