"""Sequence parallelism for Latte, applied from outside by hooks: DSP, and Ulysses / FastSeq on the spatial blocks.

Latte keeps its hidden state as (N, t, s, D) between blocks (t frames, s = h*w positions per frame) and every block
regroups it from its own shape, so a block is exact on any shard holding whole frames (spatial attention) or whole
position tracks (temporal attention). Two layouts of a rank's shard, over an sp group of p ranks:

    frames      (N, t/p, s, D)   every position of t/p frames: spatial attention needs no communication
    positions   (N, t, s/p, D)   every frame of s/p positions: temporal attention needs no communication

DSP, Dynamic Sequence Parallelism (Zhao et al., arXiv 2403.10266): each block runs in the layout where its attention
is local, and ONE all-to-all of the hidden state switches the layout between a spatial and a temporal block (its
backward is the inverse all-to-all). Attention never splits heads, so the head count need not divide by p.
Per block pair that is 2 all-to-alls of the (N, t, s, D) / p shard forward and 2 backward.

Ulysses / FastSeq on Latte: the shard stays in the positions layout; temporal blocks are local, and the spatial blocks'
attention is made Ulysses or FastSeq over the s positions of each frame (4 hidden-state volumes through all-to-alls
per block pair forward for Ulysses: q, k, v and the output).

Both split the tokens at the input of block 0 (backward: zero-pad, no communication) and all-gather them after the
final layer (backward: keep this rank's slice). Gradient convention, as for FastSeq/Ulysses on DiT
(opendit/parallel/__init__.py): every parameter gradient on an sp rank is a partial sum over its own tokens; the full
gradient is their SUM over the sp group (back-propagate loss * sp_size under a world-wide average, or call
sp_all_reduce_grads). The condition c is computed, identically, on every rank.
"""
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from opendit.errors import UsageError
from opendit.models.attention import Attention
from opendit.parallel import collectives
from opendit.parallel.attention import FastSeqAttention, UlyssesAttention
from opendit.parallel.comm import all_to_all

FRAMES, POSITIONS = 1, 2  # the sharded dimension of (N, t, s, D) in each layout
LAYOUT = {"spatial": FRAMES, "temporal": POSITIONS}  # where each block kind's attention is local


# --- autograd-correct split / gather / switch --------------------------------------------------------------------
class _Split(torch.autograd.Function):
    """x -> this rank's contiguous chunk along dim; backward zero-pads the chunk's gradient (partial-sum convention)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.dim, ctx.size, ctx.rank = dim, x.shape[dim], dist.get_rank(group)
        return x.chunk(dist.get_world_size(group), dim)[ctx.rank].contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        full = grad.new_zeros(grad.shape[: ctx.dim] + (ctx.size,) + grad.shape[ctx.dim + 1 :])
        full.narrow(ctx.dim, ctx.rank * grad.shape[ctx.dim], grad.shape[ctx.dim]).copy_(grad)
        return full, None, None


class _Gather(torch.autograd.Function):
    """This rank's chunk -> all chunks concatenated along dim in rank order; backward keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.dim, ctx.size, ctx.rank = dim, x.shape[dim], dist.get_rank(group)
        chunks = collectives.all_gather(x, group)  # (p, ...): slot j = rank j's chunk
        return torch.cat(chunks.unbind(0), dim=dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.narrow(ctx.dim, ctx.rank * ctx.size, ctx.size).contiguous(), None, None


def split(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    return _Split.apply(x, dim, group)


def gather(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    return _Gather.apply(x, dim, group)


def frames_to_positions(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """(N, t/p, s, D) -> (N, t, s/p, D) by one all-to-all (before a temporal block)."""
    p = dist.get_world_size(group)
    N, tl, s, D = x.shape
    x = x.reshape(N, tl, p, s // p, D).permute(2, 0, 1, 3, 4)  # (p, N, t/p, s/p, D): slot j = position chunk j
    x = all_to_all(x, group)  # (p, N, t/p, s/p, D): slot j = rank j's frames of this rank's positions
    return x.permute(1, 0, 2, 3, 4).reshape(N, p * tl, s // p, D)  # (N, t, s/p, D), frames in order


def positions_to_frames(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """(N, t, s/p, D) -> (N, t/p, s, D) by one all-to-all (before a spatial block)."""
    p = dist.get_world_size(group)
    N, t, sl, D = x.shape
    x = x.reshape(N, p, t // p, sl, D).transpose(0, 1)  # (p, N, t/p, s/p, D): slot j = frame chunk j
    x = all_to_all(x, group)  # (p, N, t/p, s/p, D): slot j = rank j's positions of this rank's frames
    return x.permute(1, 2, 0, 3, 4).reshape(N, t // p, p * sl, D)  # (N, t/p, s, D), positions in order


# --- hooks ---------------------------------------------------------------------------------------------------------
def _replace_x(args: tuple, kwargs: dict, fn: Callable[[torch.Tensor], torch.Tensor]):
    """A forward pre-hook's result with the block's hidden state x (first positional, or keyword "x") replaced."""
    if args:
        return (fn(args[0]), *args[1:]), kwargs
    return args, {**kwargs, "x": fn(kwargs["x"])}


def _enter_hook(layout_from: Optional[int], layout_to: int, group: dist.ProcessGroup):
    """Pre-hook putting a block's input in layout_to: split the full state (layout_from None) or switch layouts."""

    def convert(x: torch.Tensor) -> torch.Tensor:
        if layout_from is None:
            return split(x, layout_to, group)
        if layout_from == layout_to:
            return x
        return frames_to_positions(x, group) if layout_to == POSITIONS else positions_to_frames(x, group)

    return lambda module, args, kwargs: _replace_x(args, kwargs, convert)


def _gather_hook(layout: int, frames_positions, group: dist.ProcessGroup):
    """Forward hook on the final layer: this rank's (N, L, F) tokens of the (t, s) grid -> all (N, t*s, F) in order."""
    t, s = frames_positions
    p = dist.get_world_size(group)

    def hook(module, args, out):
        N, L, F = out.shape
        local = (t // p, s) if layout == FRAMES else (t, s // p)
        out = gather(out.reshape(N, *local, F), layout, group)  # (N, t, s, F)
        return out.reshape(N, L * p, F)

    return hook


def _check(model: nn.Module, group: dist.ProcessGroup, kind: str) -> None:
    if not hasattr(model, "block_kinds") or not hasattr(model, "frames_positions"):
        raise ValueError(f"{kind} applies to Latte models (blocks of kind spatial/temporal), not {type(model).__name__}")
    if getattr(model, "sequence_parallel", None):
        raise ValueError(f"sequence parallelism ({model.sequence_parallel}) was already applied to this model")
    p = dist.get_world_size(group)
    t, s = model.frames_positions
    if t % p:
        raise UsageError(f"{t} token frames do not divide by the sequence-parallel size {p} (change --num_frames or the temporal patch)")
    if s % p:
        raise UsageError(f"{s} positions per frame do not divide by the sequence-parallel size {p} (change the image size)")


def _register(model: nn.Module, group: dist.ProcessGroup, layouts) -> None:
    """Hooks that run block i in layouts[i] (splitting before block 0) and gather after the final layer."""
    previous = None
    for block, layout in zip(model.blocks, layouts):
        block.register_forward_pre_hook(_enter_hook(previous, layout, group), with_kwargs=True)
        previous = layout
    model.final_layer.register_forward_hook(_gather_hook(previous, model.frames_positions, group))


def apply_dsp(model: nn.Module, sp_group: dist.ProcessGroup) -> nn.Module:
    """Dynamic Sequence Parallelism on a Latte model over sp_group, in place (parameters and names unchanged).

    Spatial blocks run on t/p whole frames, temporal blocks on s/p whole position tracks; one all-to-all switches
    between them. A group of one is a no-op. Apply before activation checkpointing, torch.compile and FSDP/DDP."""
    _check(model, sp_group, "DSP")
    if dist.get_world_size(sp_group) == 1:
        return model
    _register(model, sp_group, [LAYOUT[kind] for kind in model.block_kinds])
    model.sequence_parallel = "dsp"
    return model


def apply_latte_sequence_parallel(model: nn.Module, sp_group: dist.ProcessGroup, kind: str = "dsp", overlap: bool = True) -> nn.Module:
    """Sequence parallelism of type kind on a Latte model, in place: "dsp" (apply_dsp), or "ulysses" / "fastseq"
    ("longseq"): the shard holds s/p positions of every frame throughout, the temporal blocks need no communication
    and the spatial blocks' attention becomes Ulysses / FastSeq (overlap: FastSeq's ring) over each frame's positions."""
    if kind == "dsp":
        return apply_dsp(model, sp_group)
    classes = {"ulysses": UlyssesAttention, "fastseq": FastSeqAttention, "longseq": FastSeqAttention}
    if kind not in classes:
        raise ValueError(f"sequence-parallel type {kind!r} for Latte: choose dsp, ulysses or fastseq (longseq)")
    _check(model, sp_group, kind)
    if dist.get_world_size(sp_group) == 1:
        return model
    options = {"overlap": overlap} if classes[kind] is FastSeqAttention else {}
    for block, block_kind in zip(model.blocks, model.block_kinds):
        if block_kind == "spatial":
            if type(block.attn) is not Attention:
                raise ValueError(f"block attention is {type(block.attn).__name__}: sequence parallelism was already applied")
            classes[kind].convert(block.attn, sp_group, **options)
    _register(model, sp_group, [POSITIONS] * len(model.blocks))
    model.sequence_parallel = kind
    return model
