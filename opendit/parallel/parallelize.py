"""The one place where parallelism and speed-ups are applied to a model from outside, so model files stay single-device.

Order: fused kernels -> sequence parallelism -> activation checkpointing -> torch.compile (per block) -> data
parallelism (FSDP2 for zero2/zero3, DDP for ddp; none for sampling) over every rank of the (dp, sp) mesh. Gradients
are averaged over all dp x sp ranks; ParallelMesh.gradient_loss scales the loss so that this is the right gradient.
"""
import os
import warnings
from functools import partial
from typing import Optional, Union

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

from opendit.parallel.mesh import ParallelMesh

PLUGINS = ("zero2", "zero3", "ddp")
# Blocks per FSDP2 unit (one all-gather and one reduce-scatter each). FSDP2 spends CPU time per unit and per parameter;
# at 28 units a DiT-XL/2 step at batch 32 waits on the CPU, at 4 units (7 blocks) it does not (docs/benchmarks.md).
BLOCKS_PER_UNIT = 7


def enable_fused_adaln(model: nn.Module) -> None:
    """Run every block's (and the final layer's) LayerNorm + modulate, gate + residual and (in training) fc1's bias +
    GELU as Triton kernels."""
    import opendit.kernels  # noqa: F401  (triton loads here, not inside a traced forward)

    model.kernels.fused_adaln = True
    model.kernels.fused_gelu = True


def enable_fast_attention(model: nn.Module) -> None:
    """Attention through the fused GPU kernels only (cuDNN / flash / memory-efficient, or flash_attn)."""
    from opendit.models.attention import Attention, fast_attention

    for module in model.modules():
        if isinstance(module, Attention):
            module.attention_fn = fast_attention


def apply_sequence_parallel_to(model: nn.Module, sp_group: dist.ProcessGroup, kind: Optional[str], overlap: bool) -> None:
    """Latte: DSP (default), Ulysses or FastSeq over each frame's positions; DiT / VDiT: FastSeq (default) or Ulysses."""
    from opendit.models import Latte
    from opendit.parallel.dsp import apply_latte_sequence_parallel
    from opendit.parallel.sequence import apply_sequence_parallel

    if isinstance(model, Latte):
        apply_latte_sequence_parallel(model, sp_group, kind=kind or "dsp", overlap=overlap)
    elif kind == "dsp":
        raise ValueError("sequence-parallel type 'dsp' (Dynamic Sequence Parallelism) needs a Latte model")
    else:
        apply_sequence_parallel(model, sp_group, kind=kind or "fastseq", overlap=overlap)


def enable_grad_checkpointing(model: nn.Module) -> None:
    """Recompute each transformer block in the backward pass; parameter names are unchanged."""
    for block in model.blocks:
        block.forward = partial(checkpoint, block.forward, use_reentrant=False)


def compile_blocks(model: nn.Module, mode: Optional[str] = None, ends: bool = False) -> None:
    """torch.compile each transformer block in place (nn.Module.compile), so parameter names are unchanged; `mode`
    is torch.compile's (e.g. "max-autotune-no-cudagraphs": Triton GEMM templates with fused epilogues, autotuned).
    ends: also what runs around the blocks, the patch + position embedding (model.embed), the timestep embedder and
    the final layer (+1-2% on DiT-B/2 at batch 64, docs/benchmarks.md; on one process, where it was measured)."""
    for block in model.blocks:
        block.compile(mode=mode)
    if ends:
        model.embed = torch.compile(model.embed, mode=mode)  # over the method: conv, reshape and + positions as one graph
        model.layer_modulations = torch.compile(model.layer_modulations, mode=mode)  # DiT with fused boundaries: one SiLU
        model.t_embedder.compile(mode=mode)
        model.final_layer.compile(mode=mode)


@torch.no_grad()
def broadcast_from_rank0(model: nn.Module, mesh: ParallelMesh) -> None:
    """Give every rank rank 0's initial weights (DDP does this itself; FSDP shards whatever each rank holds)."""
    group = mesh.reduction.get_group()
    for tensor in model.state_dict().values():
        dist.broadcast(tensor, src=dist.get_global_rank(group, 0), group=group)


def apply_fsdp(model: nn.Module, mesh: ParallelMesh, reshard_after_forward: bool, param_dtype: Optional[torch.dtype], blocks_per_unit: int = BLOCKS_PER_UNIT) -> nn.Module:
    """FSDP2 per unit of blocks_per_unit blocks and at the root, sharded over every rank: zero2 keeps the gathered
    parameters until backward (reshard_after_forward=False), zero3 frees each unit's after its forward. fp32 master weights and fp32 gradient reduction;
    forward/backward run in param_dtype (bf16/fp16) when given."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # imported here: ~0.5 s, not needed to sample

    broadcast_from_rank0(model, mesh)
    low = param_dtype is not None and param_dtype != torch.float32
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if low else MixedPrecisionPolicy()
    shard_mesh = mesh.reduction
    blocks = list(model.blocks)
    for i in range(0, len(blocks), blocks_per_unit):  # one all-gather / reduce-scatter per unit of blocks
        unit = blocks[i : i + blocks_per_unit]
        fully_shard(unit if len(unit) > 1 else unit[0], mesh=shard_mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp_policy)
    fully_shard(model, mesh=shard_mesh, reshard_after_forward=False, mp_policy=mp_policy)  # the root is needed first in backward
    return model


def apply_ddp(model: nn.Module, mesh: ParallelMesh) -> nn.Module:
    """Replicated fp32 weights, gradients all-reduced over every rank."""
    device = next(model.parameters()).device
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, process_group=mesh.reduction.get_group())


def use_quack_mlp(model: nn.Module) -> bool:
    """True where quack's MLP path runs (a Hopper GPU, quack installed, OPENDIT_QUACK not 0) and passes its check
    against PyTorch there (kernels/quack_mlp.py); a failing check is one warning, and training runs without it."""
    from opendit.kernels import quack_mlp

    weight = next(model.parameters())
    if os.environ.get("OPENDIT_QUACK", "1") == "0" or not quack_mlp.is_available(weight):
        return False
    problem = quack_mlp.self_test(weight.device)
    if problem:
        warnings.warn(f"quack-kernels is installed but its MLP path fails its check on this GPU ({problem}); training runs without it "
                      "(OPENDIT_QUACK=0 skips the check)", stacklevel=2)
    return problem is None


def parallelize(
    model: nn.Module,
    mesh: Optional[ParallelMesh] = None,
    plugin: Optional[str] = "zero2",
    param_dtype: Optional[torch.dtype] = None,
    blocks_per_unit: int = BLOCKS_PER_UNIT,
    fused_adaln: bool = False,
    flash_attention: bool = False,
    grad_checkpoint: bool = False,
    compile: Union[bool, str] = False,
    compile_mode: Optional[str] = None,
    sequence_parallel_type: Optional[str] = None,
    sequence_parallel_overlap: bool = True,
    low_precision_residual: bool = False,
) -> nn.Module:
    """Apply everything requested in the fixed order above. Returns the module to run: a DDP wrapper for ddp, the
    model itself otherwise (FSDP2 works in place; on one process, or with plugin=None for sampling, nothing wraps it).
    compile: True or "blocks" compiles each block, "model" the whole model in place."""
    if plugin is not None and plugin not in PLUGINS:
        raise ValueError(f"plugin {plugin!r}: choose one of {', '.join(PLUGINS)}")
    mesh = mesh or ParallelMesh()
    if fused_adaln:
        enable_fused_adaln(model)
    if flash_attention:
        enable_fast_attention(model)
    if low_precision_residual:  # DiT: the residual stream in the autocast dtype (+2.6% on DiT-XL/2, docs/benchmarks.md)
        model.kernels.low_precision_residual = True
    if fused_adaln and plugin is not None and mesh.sp_size == 1 and not grad_checkpoint and (mesh.device_mesh is None or plugin == "ddp"):
        model.kernels.fused_boundaries = True  # training: every block's parameters are at hand in the model's forward
        model.kernels.fused_qkv_grad = True  # the qkv gradient packed in one pass (+0.1-0.6% on DiT-XL/2, docs/benchmarks.md)
        model.kernels.quack_mlp = use_quack_mlp(model)  # fc1's GELU in quack's GEMM epilogues (+3.5% on DiT-XL/2 and B/2)
        model.kernels.quack_gemms = "fwd+dgrad" if model.kernels.quack_mlp else ""  # the other forward and input-gradient GEMMs too (+1%)
    if mesh.sp_size > 1:
        apply_sequence_parallel_to(model, mesh.sp_group, sequence_parallel_type, sequence_parallel_overlap)
    if grad_checkpoint:
        enable_grad_checkpointing(model)
    if compile == "model":  # sampling on one process: the whole forward as one graph (docs/benchmarks.md)
        model.compile(mode=compile_mode)
    elif compile:  # True or "blocks"
        compile_blocks(model, compile_mode, ends=mesh.device_mesh is None)
    if mesh.device_mesh is None or plugin is None:
        return model
    if plugin == "ddp":
        return apply_ddp(model, mesh)
    return apply_fsdp(model, mesh, reshard_after_forward=plugin == "zero3", param_dtype=param_dtype, blocks_per_unit=blocks_per_unit)
