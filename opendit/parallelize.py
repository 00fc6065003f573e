"""The one place where speed-ups are applied to a model from outside: fused kernels and activation checkpointing.

Later additions (sequence parallelism, torch.compile, FSDP2) belong here too, so model files stay single-device.
"""
from functools import partial

import torch.nn as nn
from torch.utils.checkpoint import checkpoint


def enable_fused_adaln(model: nn.Module) -> None:
    """Run every block's (and the final layer's) LayerNorm + modulate as one Triton kernel."""
    for module in model.modules():
        if hasattr(module, "fused_adaln"):
            module.fused_adaln = True


def enable_fast_attention(model: nn.Module) -> None:
    """Attention through the fused GPU kernels only (cuDNN / flash / memory-efficient, or flash_attn)."""
    from opendit.models.attention import Attention, fast_attention

    for module in model.modules():
        if isinstance(module, Attention):
            module.attention_fn = fast_attention


def enable_grad_checkpointing(model: nn.Module) -> None:
    """Recompute each transformer block in the backward pass; parameter names are unchanged."""
    for block in model.blocks:
        block.forward = partial(checkpoint, block.forward, use_reentrant=False)


def parallelize(model: nn.Module, fused_adaln: bool = False, flash_attention: bool = False, grad_checkpoint: bool = False) -> nn.Module:
    """Apply the requested speed-ups in a fixed order: kernels, then activation checkpointing."""
    if fused_adaln:
        enable_fused_adaln(model)
    if flash_attention:
        enable_fast_attention(model)
    if grad_checkpoint:
        enable_grad_checkpointing(model)
    return model
