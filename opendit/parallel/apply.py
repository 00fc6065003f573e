"""Turn a DiT/VDiT into a sequence-parallel one from outside, and the two helpers a training loop needs."""
from functools import partial
from typing import List

import torch
import torch.distributed as dist
import torch.nn as nn

from opendit.distributed.ema import local_shard
from opendit.models.attention import Attention
from opendit.parallel.attention import FastSeqAttention, UlyssesAttention
from opendit.parallel.comm import gather_tokens, split_tokens

KINDS = {"fastseq": FastSeqAttention, "longseq": FastSeqAttention, "ulysses": UlyssesAttention}  # longseq: OpenDiT's name


def apply_sequence_parallel(model: nn.Module, sp_group: dist.ProcessGroup, kind: str = "fastseq", overlap: bool = True) -> nn.Module:
    """Split the tokens over sp_group after the embedding, gather them after the final layer, and make every block's
    self-attention FastSeq or Ulysses. In place; parameter names and values are unchanged. A group of one is a no-op."""
    if kind not in KINDS:
        raise ValueError(f"sequence-parallel type {kind!r}: choose fastseq (longseq) or ulysses")
    if dist.get_world_size(sp_group) == 1:
        return model
    cls = KINDS[kind]
    options = {"overlap": overlap} if cls is FastSeqAttention else {}
    for block in model.blocks:
        if type(block.attn) is not Attention:
            raise ValueError(f"block attention is {type(block.attn).__name__}: sequence parallelism was already applied")
        cls.convert(block.attn, sp_group, **options)
    model.split_tokens = partial(split_tokens, group=sp_group)  # instance attributes shadow DiT's identity hooks
    model.gather_tokens = partial(gather_tokens, group=sp_group)
    return model


@torch.no_grad()
def sp_all_reduce_grads(model: nn.Module, sp_group: dist.ProcessGroup, bucket_numel: int = 2**25) -> None:
    """Sum the parameter gradients over sp_group (each rank holds the part from its own tokens), in flat buckets.

    Needed when the data-parallel reduction covers the dp ranks only; see opendit/parallel/__init__.py."""
    if dist.get_world_size(sp_group) == 1:
        return
    grads = [local_shard(p.grad) for p in model.parameters() if p.grad is not None]  # FSDP2 / DTensor: this rank's shard
    for dtype in sorted({g.dtype for g in grads}, key=str):  # the same order on every rank
        bucket, numel = [], 0
        for g in (g for g in grads if g.dtype == dtype):
            bucket.append(g)
            numel += g.numel()
            if numel >= bucket_numel:
                _all_reduce_flat(bucket, sp_group)
                bucket, numel = [], 0
        if bucket:
            _all_reduce_flat(bucket, sp_group)


def _all_reduce_flat(tensors: List[torch.Tensor], group: dist.ProcessGroup) -> None:
    """Sum-all-reduce tensors of one dtype as one flat buffer, copying the results back."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


@torch.no_grad()
def broadcast_from_sp_leader(*tensors: torch.Tensor, sp_group: dist.ProcessGroup):
    """Overwrite each tensor (in place) with the sp group's first rank's copy, so all sp ranks see the same batch."""
    if dist.get_world_size(sp_group) > 1:
        src = dist.get_global_rank(sp_group, 0)
        for t in tensors:
            dist.broadcast(t, src=src, group=sp_group)
    return tensors if len(tensors) != 1 else tensors[0]
