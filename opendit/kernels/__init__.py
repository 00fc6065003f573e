"""Fused Triton kernels (adaLN LayerNorm + modulate, gate + residual) with PyTorch fallbacks."""

from .fused_adaln import (
    FusedAdaLNFunction,
    GateResidualFunction,
    fused_layernorm_modulate,
    gate_residual,
    gate_residual_ref,
    is_available,
    layernorm_modulate_ref,
)

__all__ = [
    "FusedAdaLNFunction",
    "GateResidualFunction",
    "fused_layernorm_modulate",
    "gate_residual",
    "gate_residual_ref",
    "is_available",
    "layernorm_modulate_ref",
]
