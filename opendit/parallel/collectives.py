"""The raw collectives of sequence parallelism over one process group (no autograd; bench/ swaps them out)."""
from typing import List

import torch
import torch.distributed as dist

# torch >= 2.9 renamed the tensor collectives; older versions only have the *_into_tensor / *_tensor names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """x (...) on every rank -> (s, ...) with slot j holding rank j's x."""
    out = x.new_empty(dist.get_world_size(group) * x.numel())
    _all_gather_single(out, x.contiguous().view(-1), group=group)  # flat buffers: every torch version agrees on them
    return out.view(-1, *x.shape)


def reduce_scatter(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """x (s, ...) on every rank -> (...) = sum over ranks of their slot r, on rank r."""
    out = x.new_empty(x[0].numel())
    _reduce_scatter_single(out, x.contiguous().view(-1), group=group)
    return out.view(x.shape[1:])


def all_to_all(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """x (s, ...) -> (s, ...) where slot j on rank r is slot r of rank j's x (its own inverse)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def ring_exchange(send: torch.Tensor, recv: torch.Tensor, group: dist.ProcessGroup) -> List[dist.Work]:
    """Start sending `send` to the next rank of the ring and receiving `recv` from the previous one; returns the works."""
    r, s = dist.get_rank(group), dist.get_world_size(group)
    ops = [
        dist.P2POp(dist.isend, send, dist.get_global_rank(group, (r + 1) % s), group),
        dist.P2POp(dist.irecv, recv, dist.get_global_rank(group, (r - 1) % s), group),
    ]
    return dist.batch_isend_irecv(ops)
