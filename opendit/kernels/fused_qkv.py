"""The qkv projection split into heads, whose backward packs dq, dk, dv and sums the bias gradient in one Triton pass.

Forward: `x W^T + b` (one GEMM with its bias epilogue) viewed as q, k, v of shape (B, H, N, d), as Attention splits it.
Backward: the attention returns dq, dk, dv as three (B, H, N, d) tensors (cuDNN's token-major in memory); autograd
stacks them into dqkv (B N, 3C) in one pass and reads dqkv again for the bias gradient. Here one kernel writes dqkv
and per-program column sums (fp32), then the two GEMMs (dx = dqkv W, dW = dqkv^T x) run as autograd's would.
Without triton, off CUDA (unless TRITON_INTERPRET=1 at import), for fp64 or heads wider than 256, the plain PyTorch
split runs.
"""

import torch
import torch.nn.functional as F

from .fused_adaln import _launcher, _op, _ops, is_available
from .quack_mlp import linear, mm  # quack itself is imported only where a GEMM runs as quack's

if _ops is not None:
    from .fused_adaln import _COMPILED  # the custom ops' registry that _launcher reads

    def _qkv_grad_partials(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, rows_per_prog: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _ops.qkv_grad_partials(dq, dk, dv, rows_per_prog=rows_per_prog)

    def _qkv_grad_partials_fake(dq, dk, dv, rows_per_prog):
        B, H, N, D = dq.shape
        T = _ops.partials_length(B * N, rows_per_prog)
        return dq.new_empty(B * N, 3 * H * D), dq.new_empty(T, 3 * H * D, dtype=torch.float32)

    _COMPILED["qkv_grad_partials"] = _op("qkv_grad_partials", _qkv_grad_partials, _qkv_grad_partials_fake)


def qkv_heads_ref(x: torch.Tensor, weight: torch.Tensor, bias, num_heads: int, project=F.linear) -> tuple:
    """PyTorch reference: (q, k, v), each (B, H, N, d), from the (B, N, 3C) projection of x (B, N, C_in).
    project: the projection (quack_mlp.linear's choice in QkvHeadsFunction)."""
    B, N, _ = x.shape
    qkv = project(x, weight, bias).reshape(B, N, 3, num_heads, -1)  # rows ordered (q|k|v, head, d)
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, d)


def qkv_grad_ref(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference of the kernel: dqkv (B N, 3 H d) and its column sums (3 H d,) in fp32 (fp64 for fp64)."""
    B, H, N, D = dq.shape
    dqkv = torch.stack([dq, dk, dv]).permute(1, 3, 0, 2, 4).reshape(B * N, 3 * H * D)  # (3, B, H, N, d) -> (B, N, 3, H, d)
    return dqkv, dqkv.sum(0, dtype=torch.promote_types(dq.dtype, torch.float32))


class QkvHeadsFunction(torch.autograd.Function):
    """Autograd wrapper: the projection and head split forward, the Triton pack + bias sum and two GEMMs backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_heads: int, quack_gemms: str):
        ctx.save_for_backward(x, weight, bias)
        ctx.quack_gemms = quack_gemms
        return tuple(t.detach() for t in qkv_heads_ref(x, weight, bias, num_heads, linear(quack_gemms)))  # views of one (B, N, 3C) tensor

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor):
        x, weight, bias = ctx.saved_tensors
        rows = _ops.qkv_grad_rows(dq.shape[0] * dq.shape[2], dq.device)  # an argument: the compiled graph keys on it
        dqkv, dbias_p = _launcher("qkv_grad_partials")(dq, dk, dv, rows_per_prog=rows)  # (B N, 3C) in the gradients' dtype
        x2 = x.reshape(-1, x.shape[-1])  # (B N, C_in)
        dx = mm("dgrad", ctx.quack_gemms)(dqkv, weight.to(dqkv.dtype)).view(x.shape).to(x.dtype)
        dw = mm("wgrad", ctx.quack_gemms)(dqkv.t(), x2.to(dqkv.dtype)).to(weight.dtype)
        return dx, dw, dbias_p.sum(0).to(bias.dtype), None, None  # the sum fused with what follows, under torch.compile


def qkv_heads(x: torch.Tensor, weight: torch.Tensor, bias, num_heads: int, quack_gemms: str = "") -> tuple:
    """(q, k, v), each (B, H, N, d), of the projection x W^T + b of x (B, N, C_in); with the fused backward when it can
    and its launch fills the GPU. quack_gemms: with it, those of its GEMMs ("fwd+dgrad+wgrad") as quack's."""
    head_dim = weight.shape[0] // (3 * num_heads)
    if (bias is None or not is_available(x) or x.dtype == torch.float64 or head_dim > _ops.QKV_MAX_HEAD_DIM
            or not _ops.qkv_grad_fills_the_gpu(x.numel() // x.shape[-1], x.device)):
        return qkv_heads_ref(x, weight, bias, num_heads)
    return QkvHeadsFunction.apply(x, weight, bias, num_heads, quack_gemms)
