"""Multi-head self-attention. The attention maths lives here alone so it can be swapped (flash, sequence parallel)."""
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

try:  # optional: the flash_attn package, when it happens to be installed
    from flash_attn import flash_attn_func as _flash_attn_func
except ImportError:
    _flash_attn_func = None

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v on (B, H, N, d) tensors through PyTorch's fused kernels."""
    return F.scaled_dot_product_attention(q, k, v)


def fast_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA restricted to its fused GPU kernels (cuDNN first: fastest at DiT's head dim 72, then flash, then
    memory-efficient); the flash_attn package is used instead when it is installed. bf16/fp16 on CUDA."""
    if _flash_attn_func is not None and q.dtype in (torch.float16, torch.bfloat16):
        return _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION], set_priority=True):
        return F.scaled_dot_product_attention(q, k, v)


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference attention with the softmax in fp32, on (B, H, N, d) tensors."""
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, H, N, N)
    attn = attn.float().softmax(dim=-1).to(v.dtype)
    return attn @ v  # (B, H, N, d)


class Attention(nn.Module):
    """Self-attention with a fused qkv projection, laid out like timm's (and so DiT's) Attention."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attention_fn: Optional[AttentionFn] = None):
        super().__init__()
        assert dim % num_heads == 0, f"hidden size {dim} is not divisible by {num_heads} heads"
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attention_fn = attention_fn or sdpa_attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.attend(x))

    def attend(self, x: torch.Tensor, fused_qkv_grad: bool = False, quack_gemms: str = "") -> torch.Tensor:
        """The heads' outputs before the output projection: (B, N, C) -> (B, N, C). fused_qkv_grad: the projection's
        backward packs dq, dk, dv and sums the bias gradient in one Triton pass (training, a plain nn.Linear);
        quack_gemms: with it, those of the projection's GEMMs as quack's (KernelChoice.quack_gemms)."""
        B, N, C = x.shape
        if fused_qkv_grad and torch.is_grad_enabled() and type(self.qkv) is nn.Linear:
            from opendit.kernels import qkv_heads  # imports triton: only where the kernels are asked for

            q, k, v = qkv_heads(x, self.qkv.weight, self.qkv.bias, self.num_heads, quack_gemms)  # each (B, H, N, d)
        else:
            qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)  # rows ordered (q|k|v, head, d)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, d)
        x = self.attention_fn(q, k, v)  # (B, H, N, d)
        return x.transpose(1, 2).reshape(B, N, C)
