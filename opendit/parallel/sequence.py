"""Turn a DiT/VDiT into a sequence-parallel one from outside (module hooks and attention conversion)."""
from functools import partial
from typing import List

import torch
import torch.distributed as dist
import torch.nn as nn

from opendit.models.attention import Attention
from opendit.parallel.attention import FastSeqAttention, UlyssesAttention
from opendit.parallel.comm import gather_tokens, split_tokens
from opendit.parallel.mesh import local_shard

KINDS = {"fastseq": FastSeqAttention, "longseq": FastSeqAttention, "ulysses": UlyssesAttention}  # longseq: OpenDiT's name


def apply_sequence_parallel(model: nn.Module, sp_group: dist.ProcessGroup, kind: str = "fastseq", overlap: bool = True) -> nn.Module:
    """Split the tokens over sp_group as they enter the first block, gather them as they leave the final layer (module
    hooks: the model itself has no sequence-parallel code), and make every block's self-attention FastSeq or
    Ulysses. In place; parameter names and values are unchanged. A group of one is a no-op."""
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
    add_split_gather_hooks(model, partial(split_tokens, group=sp_group), partial(gather_tokens, group=sp_group))
    return model


def add_split_gather_hooks(model: nn.Module, split, gather) -> None:
    """split(x) on the hidden state (first positional input) of model.blocks[0]; gather(out) on model.final_layer's
    output: the plan by which a sequence-parallel scheme reaches an unmodified model."""

    def split_input(module, args):
        return (split(args[0]), *args[1:])

    def gather_output(module, args, output):
        return gather(output)

    model.blocks[0].register_forward_pre_hook(split_input)
    model.final_layer.register_forward_hook(gather_output)


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
