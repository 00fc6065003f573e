"""The optimizer step: AdamW on local shards, gradient clipping, fp16 loss scaling and the learning-rate schedule."""
import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from opendit.parallel.mesh import local_shard


class ShardedAdamW(torch.optim.AdamW):
    """torch.optim.AdamW with the same state (moments shaped and sharded like the parameters: what DCP saves and
    loads), whose update runs on the local shards: the DTensor path dispatches every parameter separately, which
    cost ~77 ms of CPU per DiT-XL/2 step (docs/benchmarks.md). Plain tensors pass through unchanged."""

    IMPLEMENTATION = ("fused", "foreach", "capturable")  # how this run steps, not hyperparameters of the training

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's, keeping this optimizer's implementation over the one the checkpoint's param groups name: a CPU
        run's foreach AdamW takes no found_inf / grad_scale on the GPU, the CUDA-graph step needs capturable, and the
        step counts go where this implementation keeps them."""
        mine = [{k: group[k] for k in self.IMPLEMENTATION if k in group} for group in self.param_groups]
        groups = [{**saved, **kept} for saved, kept in zip(state_dict["param_groups"], mine)]
        super().load_state_dict({**state_dict, "param_groups": groups})

    def _init_group(self, group, *tensor_lists):
        has_complex = super()._init_group(group, *tensor_lists)  # creates state on first use, fills the lists
        for tensors in tensor_lists:  # params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps
            tensors[:] = [local_shard(t) for t in tensors]
        return has_complex


def lr_factor(schedule: str, warmup_steps: int, max_steps: int, step: int) -> float:
    """Multiplier of --lr at a step: linear warmup, then constant or cosine decay to 0 at max_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def global_grad_norm(grads: list) -> torch.Tensor:
    """The 2-norm of all gradients; FSDP2 (DTensor) gradients: the local shards' squares, one all-reduce (the DTensor
    path dispatches every tensor separately and cost tens of ms per step)."""
    by_dtype = {}  # one foreach launch per dtype (bf16 working copies' gradients beside fp32 ones), fp32 norms
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(local_shard(g))
    norms = [n for group in by_dtype.values() for n in torch._foreach_norm(group, 2.0, dtype=torch.float32)]
    total = torch.stack(norms).square().sum()  # this rank's |g|^2
    if isinstance(grads[0], DTensor):
        dist.all_reduce(total, group=grads[0].device_mesh.get_group())
    return total.sqrt()


@torch.no_grad()
def clip_grad_norm(params: list, max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ that, for FSDP2 (DTensor) gradients, works on the local shards (global_grad_norm)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or not isinstance(grads[0], DTensor):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    total = global_grad_norm(grads)
    torch._foreach_mul_([local_shard(g) for g in grads], torch.clamp(max_norm / (total + 1e-6), max=1.0))
    return total


@torch.no_grad()
def grad_norm_and_divisor(grads: list, grad_clip: float) -> tuple:
    """(the global norm of grads, max(1, norm / grad_clip)) without touching them (grad_clip <= 0: no clipping):
    fused AdamW divides them by the second (its grad_scale) as it reads them, which clips as clip_grad_norm does with
    one read of them less."""
    if not grads:
        return torch.zeros(()), torch.ones(())
    total = global_grad_norm(grads)
    return total, torch.clamp((total + 1e-6) / (grad_clip if grad_clip > 0 else math.inf), min=1.0)  # 1 / clip_grad_norm's coefficient


def clip_and_check(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, params: list, grad_clip: float) -> torch.Tensor:
    """Unscale (fp16) and clip the gradients; returns the global gradient norm (a device tensor, no sync)."""
    scaler.unscale_(optimizer)
    return clip_grad_norm(params, grad_clip if grad_clip > 0 else math.inf)


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, params: list, grad_clip: float) -> tuple:
    """Unscale, clip and step; returns (gradient norm, skipped). An fp16 step whose gradients overflowed anywhere is
    skipped on every rank (the DTensor found-inf check is all-reduced) and the loss scale shrinks."""
    scaler.unscale_(optimizer)
    grad_norm = clip_grad_norm(params, grad_clip if grad_clip > 0 else math.inf)
    scale = scaler.get_scale() if scaler.is_enabled() else None
    scaler.step(optimizer)
    scaler.update()
    return grad_norm, scale is not None and scaler.get_scale() < scale
