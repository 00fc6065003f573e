"""Autograd-correct token split/gather and all-to-all over the sequence-parallel group.

Gradient convention: on an sp group every parameter gradient is a partial sum (each rank back-propagates only its
own tokens), so the full gradient is the SUM of the sp ranks' gradients. split_tokens' backward therefore pads with
zeros (no communication) and gather_tokens' backward keeps this rank's slice.
"""
import torch
import torch.distributed as dist

from opendit.errors import UsageError
from opendit.parallel import collectives


def _token_slice(group: dist.ProcessGroup, num_tokens: int) -> slice:
    s, r = dist.get_world_size(group), dist.get_rank(group)
    if num_tokens % s:
        raise UsageError(f"{num_tokens} tokens do not divide by the sequence-parallel size {s} (change the frame count or image size)")
    n = num_tokens // s
    return slice(r * n, (r + 1) * n)


class _SplitTokens(torch.autograd.Function):
    """(B, T, D) -> this rank's contiguous (B, T/s, D); backward zero-pads the slice's gradient back to (B, T, D)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.num_tokens, ctx.slice = x.shape[1], _token_slice(group, x.shape[1])
        return x[:, ctx.slice].contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        full = grad.new_zeros((grad.shape[0], ctx.num_tokens, *grad.shape[2:]))  # (B, T, D)
        full[:, ctx.slice] = grad
        return full, None


class _GatherTokens(torch.autograd.Function):
    """This rank's (B, T/s, F) -> all (B, T, F) in rank order; backward keeps this rank's slice of the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        B, n = x.shape[:2]
        ctx.slice = _token_slice(group, n * dist.get_world_size(group))
        chunks = collectives.all_gather(x, group)  # (s, B, n, F)
        return chunks.transpose(0, 1).reshape(B, -1, *x.shape[2:])  # (B, s * n, F)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad[:, ctx.slice].contiguous(), None


class _AllToAll(torch.autograd.Function):
    """collectives.all_to_all on (s, ...) tensors; being its own inverse, it is also its own backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return collectives.all_to_all(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return collectives.all_to_all(grad, ctx.group), None


def split_tokens(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return _SplitTokens.apply(x, group)


def gather_tokens(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return _GatherTokens.apply(x, group)


def all_to_all(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return _AllToAll.apply(x, group)
