"""Float8 (e4m3) GEMMs for sampling: each weight quantized once per output channel, each activation per row on the
fly, one scaled GEMM (fp32 or fast accumulation, bf16 out); in an MLP, fc1's GELU and fc2's row quantization are one
Triton pass. Forward only: sampling runs without autograd."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import fused_adaln
from .fused_adaln import _launcher, _op, _ops, is_available

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448


def quantize_rows(x: torch.Tensor) -> tuple:
    """(M, K) -> (q e4m3 (M, K), scale fp32 (M, 1)) with x ~= q * scale, each row's absolute maximum mapped to 448."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / E4M3_MAX
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def gelu_quantize_rows_ref(h: torch.Tensor) -> tuple:
    """PyTorch reference of gelu_quantize_rows: tanh-GELU in fp32 (or wider), then quantize_rows."""
    return quantize_rows(F.gelu(h.to(torch.promote_types(h.dtype, torch.float32)), approximate="tanh"))


if _ops is not None:
    def _gelu_quantize(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _ops.gelu_quantize(h)

    def _gelu_quantize_fake(h):
        return h.new_empty(h.shape, dtype=E4M3), h.new_empty(h.shape[0], 1, dtype=torch.float32)

    fused_adaln._COMPILED["gelu_quantize"] = _op("gelu_quantize", _gelu_quantize, _gelu_quantize_fake)  # torch.compile keeps the kernel in its graph


def gelu_quantize_rows(h: torch.Tensor) -> tuple:
    """(M, K) -> quantize_rows(tanh-GELU(h)) in one Triton pass where the kernels run (PyTorch elsewhere)."""
    if not is_available(h) or h.shape[-1] > _ops.MAX_BLOCK_C or h.dtype == torch.float64:
        return gelu_quantize_rows_ref(h)
    h = h.contiguous()
    return _launcher("gelu_quantize")(h)


class Float8Linear(nn.Module):
    """y = x W^T + b with x and W rounded to float8 e4m3 (per-row and per-output-channel scales), in bf16."""

    def __init__(self, linear: nn.Linear, out_dtype: torch.dtype = torch.bfloat16, fast_accum: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.out_dtype, self.fast_accum = linear.in_features, linear.out_features, out_dtype, fast_accum
        weight_q, weight_scale = quantize_rows(linear.weight.detach())
        self.register_buffer("weight_q", weight_q)  # (N, K) e4m3
        self.register_buffer("weight_scale", weight_scale.t().contiguous())  # (1, N) fp32
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(out_dtype))

    def scaled_mm(self, x_q: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
        """(M, K) e4m3 rows and their (M, 1) scales -> (M, N) in out_dtype."""
        return torch._scaled_mm(x_q, self.weight_q.t(), scale_a=x_scale, scale_b=self.weight_scale, bias=self.bias, out_dtype=self.out_dtype,
                                use_fast_accum=self.fast_accum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.scaled_mm(*quantize_rows(x.reshape(-1, self.in_features)))  # (M, N)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, float8 e4m3 -> {self.out_dtype}, fast_accum={self.fast_accum}"


class Float8Mlp(nn.Module):
    """fc2(GELU(fc1(x))) with both GEMMs in float8; fc1's tanh-GELU and the quantization of fc2's input in one pass."""

    def __init__(self, mlp: nn.Module, fast_accum: bool = False):
        super().__init__()
        self.fc1, self.fc2 = Float8Linear(mlp.fc1, fast_accum=fast_accum), Float8Linear(mlp.fc2, fast_accum=fast_accum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x).reshape(-1, self.fc1.out_features)  # (M, hidden) bf16, before the GELU
        y = self.fc2.scaled_mm(*gelu_quantize_rows(h))  # (M, C)
        return y.view(*x.shape[:-1], self.fc2.out_features)


def float8_supported(device: torch.device) -> bool:
    """Float8 GEMMs need a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def _fits(linear: nn.Module) -> bool:
    """A Linear the scaled GEMM can take (sizes multiples of 16)."""
    return isinstance(linear, nn.Linear) and linear.in_features % 16 == 0 and linear.out_features % 16 == 0


def _is_tanh_gelu_mlp(module: nn.Module) -> bool:
    act = getattr(module, "act", None)
    return isinstance(act, nn.GELU) and act.approximate == "tanh" and _fits(getattr(module, "fc1", None)) and _fits(getattr(module, "fc2", None))


def to_float8(model: nn.Module, fast_accum: bool = False, skip: tuple = ("proj",)) -> int:
    """Swap the GEMMs inside model.blocks for float8 ones: each tanh-GELU MLP for a Float8Mlp, every other Linear for a
    Float8Linear, except the adaLN modulation (one row per sample), Linears named in skip (attention's proj: measured no
    faster at sampling sizes) and sizes the scaled GEMM cannot take. -> how many GEMMs were swapped."""
    swapped = 0
    for block in model.blocks:
        for name, module in list(block.named_modules())[1:]:  # the block's submodules, parents before children
            parent_name, _, child = name.rpartition(".")
            parent = block.get_submodule(parent_name)
            if isinstance(parent, Float8Mlp):  # an MLP swapped a moment ago: its fc1 / fc2 are float8 already
                continue
            if _is_tanh_gelu_mlp(module):
                setattr(parent, child, Float8Mlp(module, fast_accum))
                swapped += 2
            elif _fits(module) and "adaLN_modulation" not in name and child not in skip:
                setattr(parent, child, Float8Linear(module, fast_accum=fast_accum))
                swapped += 1
    return swapped
