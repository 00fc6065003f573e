"""Multi-head self-attention. The attention maths lives here alone so it can be swapped (flash, sequence parallel)."""
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v on (B, H, N, d) tensors through PyTorch's fused kernels."""
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
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)  # rows ordered (q|k|v, head, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, d)
        x = self.attention_fn(q, k, v)  # (B, H, N, d)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)
