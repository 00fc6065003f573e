"""Bias + tanh GELU for training: `gelu(h + b)` in one Triton pass forward, and one backward pass that also sums b's gradient.

fc1's GEMM then runs without its bias epilogue (same cost) and the GELU kernel adds it; inductor's own kernels read the
GELU's gradient a second time for the bias. Rounding: fp32 inside, rounded once to h.dtype (`bias_gelu_ref` does the same).
Without triton, off CUDA (unless TRITON_INTERPRET=1 at import) or for fp64 the PyTorch reference runs.
"""

import torch
import torch.nn.functional as F

from .fused_adaln import _launcher, _op, _ops, is_available

if _ops is not None:
    from .fused_adaln import _COMPILED  # the custom ops' registry that _launcher reads

    Tensor = torch.Tensor

    def _bias_gelu_fwd(h: Tensor, bias: Tensor) -> Tensor:
        return _ops.bias_gelu_fwd(h, bias)

    def _bias_gelu_bwd_partials(dout: Tensor, h: Tensor, bias: Tensor, rows_per_prog: int) -> tuple[Tensor, Tensor]:
        return _ops.bias_gelu_bwd_partials(dout, h, bias, rows_per_prog=rows_per_prog)  # rows: see fused_adaln's ops

    def _bias_gelu_bwd_partials_fake(dout, h, bias, rows_per_prog):
        return torch.empty_like(h), h.new_empty(_ops.partials_length(h.shape[0], rows_per_prog), h.shape[1], dtype=torch.float32)

    _COMPILED.update({
        "bias_gelu_fwd": _op("bias_gelu_fwd", _bias_gelu_fwd, lambda h, bias: torch.empty_like(h)),
        "bias_gelu_bwd_partials": _op("bias_gelu_bwd_partials", _bias_gelu_bwd_partials, _bias_gelu_bwd_partials_fake),
    })


def bias_gelu_ref(h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """PyTorch reference: tanh-GELU(h + bias) in fp32 (fp64 for fp64 inputs), cast once to h.dtype."""
    ct = torch.promote_types(h.dtype, torch.float32)
    return F.gelu(h.to(ct) + bias.to(ct), approximate="tanh").to(h.dtype)


class BiasGeluFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton kernels of tanh-GELU(h + bias)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, bias: torch.Tensor):
        h2 = h.reshape(-1, h.shape[-1]).contiguous()  # (rows, C)
        out = _launcher("bias_gelu_fwd")(h2, bias)
        ctx.save_for_backward(h2, bias)
        return out.view(h.shape)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        h2, bias = ctx.saved_tensors
        rows = _ops.bias_gelu_bwd_rows(*h2.shape, h2.device)
        dh, dbias_p = _launcher("bias_gelu_bwd_partials")(dout.reshape(h2.shape).contiguous(), h2, bias, rows_per_prog=rows)
        return dh.view(dout.shape), dbias_p.sum(0).to(bias.dtype)  # the sum fused with what follows, under torch.compile


def bias_gelu(h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """tanh-GELU(h + bias) for h (..., C), bias (C,); Triton when available, else PyTorch."""
    if not is_available(h) or h.dtype == torch.float64 or bias.shape != h.shape[-1:]:
        return bias_gelu_ref(h, bias)
    return BiasGeluFunction.apply(h, bias)
