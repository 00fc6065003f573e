"""Fused adaLN: `LN(x) * (1 + scale) + shift` in one Triton pass (forward and backward), plus gate + residual.

Rounding: the kernels upcast every input to fp32, keep fp32 through the mean/variance (biased, with eps),
normalisation and modulation, and round once when storing y in x.dtype. `layernorm_modulate_ref` does the same
(fp32 or wider math, one final cast), so the two agree to fp32 reduction-order noise before that rounding,
i.e. within 1 ulp of x.dtype. Gradients are likewise fp32 inside and rounded once to the dtype of their input.

The kernels live in `_triton_ops`; without triton, for tensors off CUDA when TRITON_INTERPRET=1 was not set at
import, for fp64, C > 16384 or B > 65535, the public functions fall back to the PyTorch reference.
Kernel configs are autotuned per (N, C, dtypes; the backward's rows per program) on first use (a few seconds);
OPENDIT_TRITON_AUTOTUNE=0 uses fixed heuristics instead (within a few % of the tuned configs on an H200 at C=1152).
On CUDA the block boundary (gate + residual, then LayerNorm + modulate) runs `_gluon_ops`' kernels where the width
splits into two exact tiles (DiT-S/B/XL; same maths and rounding); OPENDIT_GLUON=0 keeps the Triton ones.
"""

from typing import Optional

import torch
import torch.nn.functional as F

try:
    from . import _triton_ops as _ops
except ImportError:  # no triton (e.g. CPU-only torch wheel)
    _ops = None


def is_available(device: torch.device | str | torch.Tensor) -> bool:
    """True when the Triton kernels can run for `device` (a CUDA device, or anything under TRITON_INTERPRET=1)."""
    if _ops is None:
        return False
    if isinstance(device, torch.Tensor):
        device = device.device
    # TRITON_INTERPRET is read when the kernels are defined (import time), so use the value captured then.
    return torch.device(device).type == "cuda" or _ops.INTERPRET


_MAX_B = 65535  # samples are grid axis 1


def _op(name: str, launcher, fake):
    """Register a launcher as a custom op, so torch.compile keeps the Triton kernel in its graph (no break)."""
    op = torch.library.custom_op(f"opendit::{name}", mutates_args=())(launcher)
    op.register_fake(fake)
    return op


def _launcher(name: str):
    """The launcher `name` of `_ops`: a plain Python call in eager mode, its custom op while torch.compile traces."""
    return _COMPILED[name] if torch.compiler.is_compiling() else getattr(_ops, name)


if _ops is not None:
    Tensor = torch.Tensor

    def _adaln_fwd(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
        return _ops.adaln_fwd(x, shift, scale, eps)

    def _adaln_fwd_fake(x, shift, scale, eps):
        stats = x.new_empty(x.shape[0] * x.shape[1], dtype=torch.float32)
        return torch.empty_like(x), stats, torch.empty_like(stats)

    # The backward ops return per-program partials of the modulation gradients; the autograd functions sum them,
    # where inductor fuses the sums with the casts and the modulation's concatenated gradient (one kernel each fewer).
    # Their rows per program are an argument, chosen by the caller: the compiled graph then holds the partials' length
    # (inductor's cache does not key on a custom op's fake function, so a new rule would reuse stale shapes).
    def _adaln_bwd_partials(dy: Tensor, x: Tensor, scale: Tensor, mean: Tensor, rstd: Tensor, rows_per_prog: int) -> tuple[Tensor, Tensor]:
        return _ops.adaln_bwd_partials(dy, x, scale, mean, rstd, rows_per_prog=rows_per_prog)

    def _adaln_bwd_partials_fake(dy, x, scale, mean, rstd, rows_per_prog):
        B, N, C = x.shape
        return torch.empty_like(x), x.new_empty(2, B, _ops.partials_length(B and N, rows_per_prog), C, dtype=torch.float32)

    def _gate_res_fwd(x: Tensor, gate: Tensor, y: Tensor, out_dtype: torch.dtype) -> Tensor:
        return _ops.gate_res_fwd(x, gate, y, out_dtype)

    def _gate_res_fwd_fake(x, gate, y, out_dtype):
        return x.new_empty(x.shape, dtype=out_dtype)

    def _gate_res_bwd_partials(dout: Tensor, gate: Tensor, y: Tensor, rows_per_prog: int) -> tuple[Tensor, Tensor]:
        return _ops.gate_res_bwd_partials(dout, gate, y, rows_per_prog=rows_per_prog)

    def _gate_res_bwd_partials_fake(dout, gate, y, rows_per_prog):
        B, N, C = y.shape
        return torch.empty_like(y), y.new_empty(B, _ops.partials_length(B and N, rows_per_prog), C, dtype=torch.float32)

    def _gate_res_adaln_fwd(x: Tensor, gate: Tensor, y: Tensor, shift: Tensor, scale: Tensor, eps: float, out_dtype: torch.dtype,
                            bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return _ops.gate_res_adaln_fwd(x, gate, y, shift, scale, eps, out_dtype, bias=bias)

    def _gate_res_adaln_fwd_fake(x, gate, y, shift, scale, eps, out_dtype, bias=None):
        out = x.new_empty(x.shape, dtype=out_dtype)
        stats = x.new_empty(x.shape[0] * x.shape[1], dtype=torch.float32)
        return out, torch.empty_like(out), stats, torch.empty_like(stats)

    def _gate_res_adaln_bwd_partials(dout: Tensor, dh: Tensor, out: Tensor, y: Tensor, gate: Tensor, scale: Tensor, mean: Tensor, rstd: Tensor,
                                     x_dtype: torch.dtype, rows_per_prog: int, bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        return _ops.gate_res_adaln_bwd_partials(dout, dh, out, y, gate, scale, mean, rstd, x_dtype, rows_per_prog=rows_per_prog, bias=bias)

    def _gate_res_adaln_bwd_partials_fake(dout, dh, out, y, gate, scale, mean, rstd, x_dtype, rows_per_prog, bias=None):
        B, N, C = out.shape
        partials = out.new_empty(3 if bias is None else 4, B, _ops.partials_length(B and N, rows_per_prog), C, dtype=torch.float32)
        return out.new_empty(out.shape, dtype=x_dtype), torch.empty_like(y), partials

    _COMPILED = {
        "gate_res_adaln_fwd": _op("gate_res_adaln_fwd", _gate_res_adaln_fwd, _gate_res_adaln_fwd_fake),
        "gate_res_adaln_bwd_partials": _op("gate_res_adaln_bwd_partials", _gate_res_adaln_bwd_partials, _gate_res_adaln_bwd_partials_fake),
        "adaln_fwd": _op("adaln_fwd", _adaln_fwd, _adaln_fwd_fake),
        "adaln_bwd_partials": _op("adaln_bwd_partials", _adaln_bwd_partials, _adaln_bwd_partials_fake),
        "gate_res_fwd": _op("gate_res_fwd", _gate_res_fwd, _gate_res_fwd_fake),
        "gate_res_bwd_partials": _op("gate_res_bwd_partials", _gate_res_bwd_partials, _gate_res_bwd_partials_fake),
    }


def _expand_rows(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """View a (B, C) or (B, 1, C) modulation tensor so that it broadcasts against x (B, ..., C)."""
    return v.reshape(v.shape[0], *([1] * (x.dim() - 2)), v.shape[-1])


def layernorm_modulate_ref(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """PyTorch reference: (LN(x) * (1 + scale) + shift) in fp32 (fp64 for fp64 inputs), cast once to x.dtype."""
    ct = torch.promote_types(x.dtype, torch.float32)
    xn = F.layer_norm(x.to(ct), (x.shape[-1],), eps=eps)
    return (xn * (1 + _expand_rows(scale, x).to(ct)) + _expand_rows(shift, x).to(ct)).to(x.dtype)


def gate_residual_ref(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PyTorch reference of x + gate[:, None] * y in fp32 (or wider), cast once to the promoted dtype."""
    out_dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), gate.dtype)
    ct = torch.promote_types(out_dtype, torch.float32)
    return (x.to(ct) + _expand_rows(gate, x).to(ct) * y.to(ct)).to(out_dtype)


def _rows(v: torch.Tensor, B: int, C: int, name: str) -> torch.Tensor:
    """(B, C) or (B, 1, C) -> (B, C) view with unit column stride (row stride may be anything, e.g. a chunk)."""
    if v.numel() != B * C or v.shape[0] != B or v.shape[-1] != C:
        raise ValueError(f"{name} must have shape (B, C) = ({B}, {C}), got {tuple(v.shape)}")
    v = v.reshape(B, C)
    return v if v.stride(1) == 1 else v.contiguous()


def _as_bnc(x: torch.Tensor) -> torch.Tensor:
    """(B, ..., C) -> contiguous (B, N, C)."""
    if x.dim() < 2:
        raise ValueError(f"x must have shape (B, ..., C), got {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1, x.shape[-1]).contiguous()


class FusedAdaLNFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton forward/backward kernels of LN(x) * (1 + scale) + shift."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6):
        x3 = _as_bnc(x)  # (B, N, C)
        B, _, C = x3.shape
        shift2, scale2 = _rows(shift, B, C, "shift"), _rows(scale, B, C, "scale")  # (B, C)
        y, mean, rstd = _launcher("adaln_fwd")(x3, shift2, scale2, eps)
        ctx.save_for_backward(x3, scale2, mean, rstd)
        ctx.meta = (x.shape, shift.shape, shift.dtype, scale.shape, scale.dtype)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x3, scale2, mean, rstd = ctx.saved_tensors
        x_shape, shift_shape, shift_dtype, scale_shape, scale_dtype = ctx.meta
        dy3 = dy.reshape(x3.shape).to(x3.dtype).contiguous()
        rows = _ops.bwd_rows_per_program(x3.shape[0], x3.shape[1], x3.device)
        dx, partials = _launcher("adaln_bwd_partials")(dy3, x3, scale2, mean, rstd, rows_per_prog=rows)
        dscale, dshift = partials.sum(2).unbind(0)  # (B, C) each
        return (
            dx.view(x_shape),
            dshift.to(shift_dtype).view(shift_shape),
            dscale.to(scale_dtype).view(scale_shape),
            None,
        )


def fused_layernorm_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """LN(x) * (1 + scale) + shift for x (B, ..., C), shift/scale (B, C); Triton when available, else PyTorch."""
    if not is_available(x) or x.shape[-1] > _ops.MAX_BLOCK_C or x.shape[0] > _MAX_B or x.dtype == torch.float64:
        return layernorm_modulate_ref(x, shift, scale, eps)
    return FusedAdaLNFunction.apply(x, shift, scale, eps)


class GateResidualFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton kernels of x + gate[:, None] * y."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor):
        x3, y3 = _as_bnc(x), _as_bnc(y)  # (B, N, C)
        B, _, C = x3.shape
        gate2 = _rows(gate, B, C, "gate")  # (B, C)
        out_dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), gate.dtype)
        out = _launcher("gate_res_fwd")(x3, gate2, y3, out_dtype)
        ctx.save_for_backward(gate2, y3)
        ctx.meta = (x.shape, x.dtype, gate.shape, gate.dtype)
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        gate2, y3 = ctx.saved_tensors
        x_shape, x_dtype, gate_shape, gate_dtype = ctx.meta
        dout3 = dout.reshape(y3.shape).contiguous()
        dy, dgate_p = _launcher("gate_res_bwd_partials")(dout3, gate2, y3, rows_per_prog=_ops.gate_res_bwd_rows(*y3.shape, y3.device))
        dgate = dgate_p.sum(1)  # (B, C)
        return dout.to(x_dtype).reshape(x_shape), dgate.to(gate_dtype).view(gate_shape), dy.view(x_shape)


def gate_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + gate[:, None] * y for x, y (B, ..., C), gate (B, C), fused in one pass; PyTorch fallback off-GPU."""
    dtypes = (x.dtype, y.dtype, gate.dtype)
    if not is_available(x) or x.shape != y.shape or x.shape[0] > _MAX_B or torch.float64 in dtypes:
        return gate_residual_ref(x, gate, y)
    return GateResidualFunction.apply(x, gate, y)


class GateResidualAdaLNFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton kernels of out = x + gate[:, None] * (y + bias), h = LN(out) * (1 + scale) + shift."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
                bias: Optional[torch.Tensor] = None):
        x3, y3 = _as_bnc(x), _as_bnc(y)  # (B, N, C)
        B, _, C = x3.shape
        gate2, shift2, scale2 = _rows(gate, B, C, "gate"), _rows(shift, B, C, "shift"), _rows(scale, B, C, "scale")  # (B, C)
        out_dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), gate.dtype)
        out, h, mean, rstd = _launcher("gate_res_adaln_fwd")(x3, gate2, y3, shift2, scale2, eps, out_dtype, bias=bias)
        ctx.save_for_backward(out, y3, gate2, scale2, mean, rstd, bias)
        ctx.meta = (x.shape, x.dtype, [(t.shape, t.dtype) for t in (gate, shift, scale)])
        return out.view(x.shape), h.view(x.shape)

    @staticmethod
    def backward(ctx, dout: torch.Tensor, dh: torch.Tensor):
        out, y3, gate2, scale2, mean, rstd, bias = ctx.saved_tensors
        x_shape, x_dtype, (gate_meta, shift_meta, scale_meta) = ctx.meta
        dout3, dh3 = (g.reshape(out.shape).to(out.dtype).contiguous() for g in (dout, dh))  # zeros where unused (materialized)
        rows = _ops.boundary_bwd_rows(*out.shape, out.device)
        dx, dy, partials = _launcher("gate_res_adaln_bwd_partials")(dout3, dh3, out, y3, gate2, scale2, mean, rstd, x_dtype, rows_per_prog=rows, bias=bias)
        dscale, dshift, dgate = partials[:3].sum(2).unbind(0)  # (B, C) each
        dbias = None if bias is None else partials[3].sum((0, 1)).to(bias.dtype)  # (C,)
        as_input = lambda g, meta: g.to(meta[1]).view(meta[0])  # noqa: E731
        return dx.view(x_shape), as_input(dgate, gate_meta), dy.view(x_shape), as_input(dshift, shift_meta), as_input(dscale, scale_meta), None, dbias


def gate_residual_layernorm_modulate(
    x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
    bias: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, h): out = x + gate[:, None] * (y + bias) and h = LN(out) * (1 + scale) + shift, for x, y (B, ..., C), (B, C)
    modulation and an optional (C,) bias (the branch's last Linear's, left out of its GEMM: its gradient is summed here),
    in one pass forward and one backward; the two separate functions where the kernels cannot run."""
    if bias is not None and bias.shape != x.shape[-1:]:
        raise ValueError(f"bias must have shape (C,) = ({x.shape[-1]},), got {tuple(bias.shape)}")
    dtypes = (x.dtype, y.dtype, gate.dtype)
    if not is_available(x) or x.shape != y.shape or x.shape[-1] > _ops.MAX_BLOCK_C or x.shape[0] > _MAX_B or torch.float64 in dtypes:
        out = gate_residual(x, gate, y if bias is None else y + bias.to(y.dtype))
        return out, fused_layernorm_modulate(out, shift, scale, eps)
    return GateResidualAdaLNFunction.apply(x, gate, y, shift, scale, eps, bias)
