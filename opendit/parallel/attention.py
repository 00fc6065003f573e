"""Sequence-parallel self-attention: FastSeq (gather tokens, split heads) and Ulysses (all-to-all q, k, v).

Both take this rank's (B, n, C) tokens and return its (B, n, C) output; n = N / s for a group of s ranks. They keep
the Attention's qkv and proj in DiT's layout (rows (q|k|v, head, d)), so checkpoints need no conversion, and run
its attention_fn (sdpa, fused kernels, ...) on the local heads over the full sequence.
"""
import torch
import torch.distributed as dist

from opendit.errors import UsageError
from opendit.models.attention import Attention
from opendit.parallel.comm import all_to_all
from opendit.parallel.gather_linear import gather_linear


def heads_to_tokens(o: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """(B, H/s, N, d) local heads of all tokens -> (B, n, C) all heads of this rank's tokens."""
    s = dist.get_world_size(group)
    B, h, N, d = o.shape
    o = o.reshape(B, h, s, N // s, d).permute(2, 0, 3, 1, 4)  # (s, B, n, H/s, d): slot j = rank j's tokens
    o = all_to_all(o, group)  # (s, B, n, H/s, d): slot j = rank j's heads
    return o.permute(1, 2, 0, 3, 4).reshape(B, N // s, s * h * d)  # (B, n, C), heads in order


class SequenceParallelAttention(Attention):
    """An Attention converted in place (parameters, names and attention_fn kept) to run over an sp group."""

    @classmethod
    def convert(cls, attn: Attention, group: dist.ProcessGroup, **options) -> Attention:
        s = dist.get_world_size(group)
        if attn.num_heads % s:
            raise UsageError(f"{attn.num_heads} attention heads do not divide by the sequence-parallel size {s}")
        attn.__class__ = cls
        attn.sp_group, attn.sp_rank, attn.sp_size = group, dist.get_rank(group), s
        attn.__dict__.update(options)
        return attn


class FastSeqAttention(SequenceParallelAttention):
    """FastSeq: AllGather the tokens (ring-overlapped with the qkv GEMM), local-head attention, AllToAll back."""

    overlap: bool = True

    def local_qkv(self):
        """The rows of qkv.weight / qkv.bias for this rank's heads, ordered (q|k|v, local head, d)."""
        C, s, r = self.qkv.in_features, self.sp_size, self.sp_rank
        weight = self.qkv.weight.view(3, s, C // s, C)[:, r].reshape(3 * C // s, C)  # (3C/s, C)
        bias = self.qkv.bias.view(3, s, C // s)[:, r].reshape(-1) if self.qkv.bias is not None else None  # (3C/s,)
        return weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, n, C = x.shape
        h, d = self.num_heads // self.sp_size, self.head_dim
        qkv = gather_linear(x, *self.local_qkv(), self.sp_group, self.overlap)  # (B, N, 3C/s)
        q, k, v = qkv.reshape(B, -1, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H/s, N, d)
        o = self.attention_fn(q, k, v)  # (B, H/s, N, d)
        return self.proj(heads_to_tokens(o, self.sp_group))  # (B, n, C)


class UlyssesAttention(SequenceParallelAttention):
    """DeepSpeed-Ulysses: local qkv, one AllToAll of q, k, v to (local heads, all tokens), attention, AllToAll back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, n, C = x.shape
        s, d = self.sp_size, self.head_dim
        h = self.num_heads // s
        qkv = self.qkv(x).reshape(B, n, 3, s, h, d).permute(3, 2, 0, 4, 1, 5)  # (s, 3, B, H/s, n, d): slot j = rank j's heads
        qkv = all_to_all(qkv, self.sp_group)  # (s, 3, B, H/s, n, d): slot j = rank j's tokens
        q, k, v = qkv.permute(1, 2, 3, 0, 4, 5).reshape(3, B, h, s * n, d).unbind(0)  # each (B, H/s, N, d)
        o = self.attention_fn(q, k, v)  # (B, H/s, N, d)
        return self.proj(heads_to_tokens(o, self.sp_group))  # (B, n, C)
