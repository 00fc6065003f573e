"""Transformer blocks with adaptive layer norm zero (adaLN-Zero) conditioning."""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from opendit.models.attention import Attention


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift, with (N, D) scale/shift broadcast over the tokens of (N, T, D) x."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def norm_modulate(norm: nn.LayerNorm, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, fused: bool) -> torch.Tensor:
    """modulate(norm(x), shift, scale); fused=True runs it as one Triton kernel (statistics and maths in fp32)."""
    if fused:
        from opendit.kernels import fused_layernorm_modulate  # imports triton: only where the kernels are asked for

        return fused_layernorm_modulate(x, shift, scale, eps=norm.eps)
    return modulate(norm(x), shift, scale)


def add_gated(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, fused: bool) -> torch.Tensor:
    """x + gate * y with an (N, D) gate broadcast over the tokens; fused=True runs it as one Triton kernel."""
    if fused:
        from opendit.kernels import gate_residual

        return gate_residual(x, gate, y)
    return x + gate.unsqueeze(1) * y


@dataclass
class KernelChoice:
    """Which implementation a model's blocks run; one object shared by all of them, switched from outside."""

    fused_adaln: bool = False  # LayerNorm + modulate and gate + residual as Triton kernels (--enable_modulate_kernel)
    low_precision_residual: bool = False  # under autocast, carry the residual stream in the autocast dtype (bf16), not fp32
    gelu_epilogue: bool = False  # CUDA, no autograd (sampling): fc1 + bias + tanh GELU as one cuBLASLt GEMM epilogue
    fused_gelu: bool = False  # with autograd (training): fc1's bias + tanh GELU as one Triton kernel, forward and backward
    fused_boundaries: bool = False  # with fused_adaln, DiT: each block's last gate + residual and the next block's (or the
    # final layer's) LayerNorm + modulate as one kernel; the model computes every modulation before the blocks
    fused_qkv_grad: bool = False  # with fused_boundaries: the qkv projection's backward packs dq, dk, dv and sums its bias
    # gradient in one Triton pass (kernels/fused_qkv.py; parallelize turns it on with fused_boundaries)
    quack_mlp: bool = False  # with fused_boundaries, autograd, Hopper + quack: fc1's GELU and its gradient in quack's GEMM epilogues
    quack_gemms: str = ""  # with quack_mlp: the block's plain GEMMs of these kinds ("fwd", "dgrad", "wgrad", joined by "+") as
    # quack's too, in qkv, proj and the MLP (parallelize: "fwd+dgrad", +1% on DiT-XL/2 and B/2; quack's weight gradients lose)


def add_gated_norm_modulate(norm: nn.LayerNorm, x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor,
                            scale: torch.Tensor, fused: bool, bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + gate * y, modulate(norm(x + gate * y), shift, scale)), y plus `bias` when given (the branch's last bias,
    left out of its GEMM); fused=True runs both as one Triton kernel, which also sums the bias's gradient."""
    if fused:
        from opendit.kernels import gate_residual_layernorm_modulate

        return gate_residual_layernorm_modulate(x, gate, y, shift, scale, eps=norm.eps, bias=bias)
    x = add_gated(x, gate, y if bias is None else y + bias.to(y.dtype), fused)  # y keeps its dtype (bf16 under autocast)
    return x, norm_modulate(norm, x, shift, scale, fused)


def linear_gelu(fc: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(x W^T + b) with the GELU in the GEMM's epilogue (cuBLASLt; CUDA, forward only), in the autocast dtype."""
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else fc.weight.dtype
    h = torch._addmm_activation(fc.bias.to(dtype), x.reshape(-1, x.shape[-1]).to(dtype), fc.weight.to(dtype).t(), use_gelu=True)
    return h.view(*x.shape[:-1], h.shape[-1])  # (..., hidden)


class Mlp(nn.Module):
    """Two-layer MLP with tanh-approximated GELU (timm's Mlp layout)."""

    def __init__(self, in_features: int, hidden_features: int, kernels: Optional[KernelChoice] = None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.kernels = kernels or KernelChoice()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.hidden(x))

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The activation before fc2: (..., in) -> (..., hidden)."""
        if self.kernels.gelu_epilogue and x.is_cuda and not torch.is_grad_enabled() and isinstance(self.fc1, nn.Linear):  # not a Float8Linear
            return linear_gelu(self.fc1, x)
        if self.kernels.fused_gelu and torch.is_grad_enabled() and isinstance(self.fc1, nn.Linear):
            from opendit.kernels import bias_gelu

            return bias_gelu(F.linear(x, self.fc1.weight), self.fc1.bias)
        return self.act(self.fc1(x))

    def without_out_bias(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(fc2(hidden(x)) without fc2's bias, that bias), as without_bias(fc2, hidden(x))."""
        if self.kernels.quack_mlp and quack_fits(x, self.fc1, self.fc2):
            from opendit.kernels.quack_mlp import quack_mlp  # whoever sets quack_mlp checks quack_mlp.is_available

            return quack_mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.kernels.quack_gemms), self.fc2.bias
        return without_bias(self.fc2, self.hidden(x))


def quack_fits(x: torch.Tensor, *linears: nn.Module) -> bool:
    """True where quack's GEMMs may take these layers: autograd on, x on the GPU in bf16 (its autocast dtype where
    autocast is on), plain nn.Linear layers whose widths are 16-byte rows (the measured case)."""
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
    return torch.is_grad_enabled() and x.is_cuda and dtype == torch.bfloat16 and all(
        type(m) is nn.Linear and m.in_features % 8 == 0 and m.out_features % 8 == 0 for m in linears)


def without_bias(linear: nn.Module, x: torch.Tensor, quack_gemms: str = "") -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(x W^T, b) for a plain nn.Linear with a bias, which the caller adds (in the next fused kernel); else (linear(x), None).
    quack_gemms: those of x W^T's GEMMs as quack's (KernelChoice.quack_gemms, where the caller checked quack_fits)."""
    if type(linear) is nn.Linear and linear.bias is not None:
        if quack_gemms:
            from opendit.kernels.quack_mlp import quack_linear

            return quack_linear(x, linear.weight, quack_gemms), linear.bias
        return F.linear(x, linear.weight), linear.bias
    return linear(x), None


class DiTBlock(nn.Module):
    """A DiT block with adaptive layer norm zero (adaLN-Zero) conditioning."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, kernels: Optional[KernelChoice] = None):
        super().__init__()
        self.kernels = kernels or KernelChoice()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), self.kernels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: Optional[torch.Tensor], mod: Optional[torch.Tensor] = None, h: Optional[torch.Tensor] = None,
                next_mod: Optional[torch.Tensor] = None):
        """x: (N, T, D); c: (N, D); mod: adaLN_modulation(c) (N, 6D) computed beforehand, used in place of c.
        h: this block's norm1 + modulate of x, computed by the block before. next_mod: the next layer's modulation
        (its shift and scale first): the block then returns (x, that layer's LayerNorm + modulate of x)."""
        mod = self.adaLN_modulation(c) if mod is None else mod
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        fused = self.kernels.fused_adaln
        h = norm_modulate(self.norm1, x, shift_msa, scale_msa, fused) if h is None else h
        if next_mod is not None:  # every gate + residual meets a norm: proj's and fc2's biases go into those kernels
            gemms = self.kernels.quack_gemms if self.kernels.quack_mlp and quack_fits(h, self.attn.qkv, self.attn.proj) else ""
            y, bias = without_bias(self.attn.proj, self.attn.attend(h, self.kernels.fused_qkv_grad, gemms), gemms)
            x, h = add_gated_norm_modulate(self.norm2, x, gate_msa, y, shift_mlp, scale_mlp, fused, bias)  # x += gate * y; h = adaLN(x)
            D = x.shape[-1]
            y, bias = self.mlp.without_out_bias(h)
            return add_gated_norm_modulate(self.norm1, x, gate_mlp, y, next_mod[:, :D], next_mod[:, D : 2 * D], fused, bias)  # every norm: eps 1e-6
        x, h = add_gated_norm_modulate(self.norm2, x, gate_msa, self.attn(h), shift_mlp, scale_mlp, fused)
        return add_gated(x, gate_mlp, self.mlp(h), fused)  # (N, T, D)


class FinalLayer(nn.Module):
    """The final layer of DiT: adaLN modulation, then a linear map from tokens to patches."""

    def __init__(self, hidden_size: int, patch_numel: int, out_channels: int, kernels: Optional[KernelChoice] = None):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_numel * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))
        self.kernels = kernels or KernelChoice()

    def forward(self, x: torch.Tensor, c: Optional[torch.Tensor], mod: Optional[torch.Tensor] = None, h: Optional[torch.Tensor] = None) -> torch.Tensor:
        """h: the LayerNorm + modulate of x, computed by the last block (x is not read then)."""
        if h is None:
            shift, scale = (self.adaLN_modulation(c) if mod is None else mod).chunk(2, dim=1)
            h = norm_modulate(self.norm_final, x, shift, scale, self.kernels.fused_adaln)
        return self.linear(h)  # (N, T, patch_numel * out_channels)
