"""Fused Triton kernels (adaLN LayerNorm + modulate, gate + residual, bias + GELU, the qkv gradient) with PyTorch fallbacks."""

from .fused_adaln import (
    FusedAdaLNFunction,
    GateResidualAdaLNFunction,
    GateResidualFunction,
    fused_layernorm_modulate,
    gate_residual,
    gate_residual_layernorm_modulate,
    gate_residual_ref,
    is_available,
    layernorm_modulate_ref,
)
from .fused_gelu import BiasGeluFunction, bias_gelu, bias_gelu_ref
from .fused_qkv import QkvHeadsFunction, qkv_grad_ref, qkv_heads, qkv_heads_ref

__all__ = [
    "BiasGeluFunction",
    "bias_gelu",
    "bias_gelu_ref",
    "FusedAdaLNFunction",
    "GateResidualAdaLNFunction",
    "GateResidualFunction",
    "fused_layernorm_modulate",
    "gate_residual",
    "gate_residual_layernorm_modulate",
    "gate_residual_ref",
    "is_available",
    "layernorm_modulate_ref",
    "QkvHeadsFunction",
    "qkv_grad_ref",
    "qkv_heads",
    "qkv_heads_ref",
]
