"""y = linear(all_gather(x)) over the sp group, with the gather hidden behind the GEMM by an asynchronous ring.

Forward (overlap): s - 1 ring steps; at each step the chunk received last travels on to the next rank while its
GEMM runs. Backward (overlap): a ring reduce-scatter of the gradient w.r.t. the gathered input; at each step the
partial sum travels on while the input- and weight-gradient GEMMs of the next chunk run. overlap=False uses one
all-gather and one reduce-scatter instead (to measure what the overlap saves).
"""
from typing import Optional

import torch
import torch.distributed as dist

from opendit.parallel import collectives


def _linear_into(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    """out (..., F) = x (..., C) @ weight.T + bias, written in place into a contiguous out."""
    out2d, x2d = out.view(-1, out.shape[-1]), x.reshape(-1, x.shape[-1])  # (B * n, F), (B * n, C)
    if bias is None:
        torch.mm(x2d, weight.t(), out=out2d)
    else:
        torch.addmm(bias, x2d, weight.t(), out=out2d)


def _ring_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], group: dist.ProcessGroup, chunks: torch.Tensor, out: torch.Tensor) -> None:
    """Fill chunks (s, B, n, C) with every rank's x and out (s, B, n, F) with their GEMMs, overlapping the two."""
    r, s = dist.get_rank(group), dist.get_world_size(group)
    chunks[r] = x
    for step in range(s):
        held = (r - step) % s  # the chunk this rank has had since the previous step
        works = collectives.ring_exchange(chunks[held], chunks[(held - 1) % s], group) if step < s - 1 else []
        _linear_into(out[held], chunks[held], weight, bias)  # overlapped with the transfer
        for work in works:
            work.wait()


def _ring_backward(grad: torch.Tensor, chunks: torch.Tensor, weight: torch.Tensor, group: dist.ProcessGroup, need_weight: bool):
    """grad (s, B, n, F), chunks (s, B, n, C) -> (this rank's input gradient (B, n, C) summed over the ring, weight gradient)."""
    r, s = dist.get_rank(group), dist.get_world_size(group)
    acc_dtype = torch.promote_types(weight.dtype, torch.float32)
    grad_weight = weight.new_zeros(weight.shape, dtype=acc_dtype) if need_weight else None
    partial = grad[(r - 1) % s] @ weight  # (B, n, C): the input gradient of chunk r - 1 from this rank's heads
    for step in range(s - 1):
        sent, coming = (r - step - 1) % s, (r - step - 2) % s
        received = torch.empty_like(partial)
        works = collectives.ring_exchange(partial, received, group)
        mine = grad[coming] @ weight  # overlapped with the transfer, as is the weight GEMM below
        if need_weight:
            grad_weight += (grad[sent].flatten(0, 1).t() @ chunks[sent].flatten(0, 1)).to(acc_dtype)  # (F, C)
        for work in works:
            work.wait()
        partial = received.add_(mine)
    if need_weight:
        grad_weight += (grad[r].flatten(0, 1).t() @ chunks[r].flatten(0, 1)).to(acc_dtype)
    return partial, grad_weight


class GatherLinear(torch.autograd.Function):
    """(B, n, C) local tokens -> (B, s * n, F) = linear(all tokens of the group in rank order, weight, bias)."""

    @staticmethod
    def forward(ctx, x, weight, bias, group, overlap):
        s = dist.get_world_size(group)
        B, n, C = x.shape
        out = x.new_empty(s, B, n, weight.shape[0])  # (s, B, n, F): chunk j = rank j's tokens
        if overlap and s > 1:
            chunks = x.new_empty(s, B, n, C)
            _ring_forward(x, weight, bias, group, chunks, out)
        else:
            chunks = collectives.all_gather(x, group)  # (s, B, n, C)
            _linear_into(out, chunks, weight, bias)
        ctx.save_for_backward(chunks, weight)
        ctx.group, ctx.overlap = group, overlap
        return out.transpose(0, 1).reshape(B, s * n, -1)  # (B, N, F); a view when B == 1

    @staticmethod
    def backward(ctx, grad_out):
        chunks, weight = ctx.saved_tensors
        s, B, n, C = chunks.shape
        grad = grad_out.reshape(B, s, n, -1).transpose(0, 1).contiguous()  # (s, B, n, F)
        need_weight = ctx.needs_input_grad[1]
        if ctx.overlap and s > 1:
            grad_x, grad_weight = _ring_backward(grad, chunks, weight, ctx.group, need_weight)
        else:
            grad_x = collectives.reduce_scatter(grad @ weight, ctx.group)  # (s, B, n, C) summed over ranks -> (B, n, C)
            grad_weight = grad.reshape(-1, grad.shape[-1]).t() @ chunks.reshape(-1, C) if need_weight else None  # (F, C)
        grad_bias = grad.sum(dim=(0, 1, 2)) if ctx.needs_input_grad[2] else None  # False when bias is None
        grad_weight = grad_weight.to(weight.dtype) if grad_weight is not None else None
        return grad_x, grad_weight, grad_bias, None, None


def gather_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], group: dist.ProcessGroup, overlap: bool = True) -> torch.Tensor:
    """linear(all_gather(x)) on (B, n, C) -> (B, N, F); under autocast the GEMMs run in the autocast dtype like F.linear."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    with torch.autocast(device_type, enabled=False):
        return GatherLinear.apply(x, weight, bias, group, overlap)
