"""Float8 (e4m3) linear layers for sampling: each weight quantized once per output channel, each activation per row on
the fly, one scaled GEMM (fp32 accumulation, bf16 out). Forward only: sampling runs without autograd."""
import torch
import torch.nn as nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448


def quantize_rows(x: torch.Tensor) -> tuple:
    """(M, K) -> (q e4m3 (M, K), scale fp32 (M, 1)) with x ~= q * scale, each row's absolute maximum mapped to 448."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / E4M3_MAX
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


class Float8Linear(nn.Module):
    """y = x W^T + b with x and W rounded to float8 e4m3 (per-row and per-output-channel scales), in bf16."""

    def __init__(self, linear: nn.Linear, out_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features, self.out_dtype = linear.in_features, linear.out_features, out_dtype
        weight_q, weight_scale = quantize_rows(linear.weight.detach())
        self.register_buffer("weight_q", weight_q)  # (N, K) e4m3
        self.register_buffer("weight_scale", weight_scale.t().contiguous())  # (1, N) fp32
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(out_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_q, x_scale = quantize_rows(x.reshape(-1, self.in_features))  # (M, K), (M, 1)
        y = torch._scaled_mm(x_q, self.weight_q.t(), scale_a=x_scale, scale_b=self.weight_scale, bias=self.bias, out_dtype=self.out_dtype)  # (M, N)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, float8 e4m3 -> {self.out_dtype}"


def float8_supported(device: torch.device) -> bool:
    """Float8 GEMMs need a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def to_float8(model: nn.Module, out_dtype: torch.dtype = torch.bfloat16) -> int:
    """Swap every Linear inside model.blocks for a Float8Linear, except the adaLN modulation (one row per sample) and
    layers whose sizes are not multiples of 16 (the scaled GEMM's requirement). -> how many were swapped."""
    swapped = 0
    for block in model.blocks:
        for name, module in list(block.named_modules()):
            if not isinstance(module, nn.Linear) or "adaLN_modulation" in name or module.in_features % 16 or module.out_features % 16:
                continue
            parent_name, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent_name) if parent_name else block, child, Float8Linear(module, out_dtype))
            swapped += 1
    return swapped
