"""AdamW on fp32 master weights that also writes their bf16 copies, in one pass per tensor.

The maths is torch's fused AdamW (its order of operations): g = grad / grad_scale; p -= lr * wd * p;
m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2; p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps); copy = p rounded
to nearest even, as autocast's cast rounds (other copy dtypes take the reference). A step with found_inf != 0 reads
and writes nothing. It reads a bf16 gradient (2 bytes) where torch's fused AdamW reads an fp32 one and, given a
grad_scale, writes it back unscaled: 28 bytes per parameter instead of 32, the copy included. Without triton, or off
CUDA (unless TRITON_INTERPRET=1 at import), the PyTorch reference runs. Given the fp32 EMA of p, the pass also moves
it towards the new p (8 bytes a parameter, where a separate EMA update reads p again: 12).
"""
import torch

from .fused_adaln import _ops, is_available


def adamw_scalars(lr, step: torch.Tensor, beta1: float, beta2: float, grad_scale: torch.Tensor, found_inf: torch.Tensor) -> torch.Tensor:
    """The kernel's per-step scalars as one fp32 device tensor, without a host sync: lr, lr / (1 - b1^step),
    sqrt(1 - b2^step), grad_scale, found_inf (step: the count including this step; lr a float or a device tensor)."""
    step = step.double()
    lr = torch.as_tensor(lr, dtype=torch.float64, device=step.device)
    bias_correction1 = 1 - torch.pow(beta1, step)
    bias_correction2_sqrt = (1 - torch.pow(beta2, step)).sqrt()
    return torch.stack([lr, lr / bias_correction1, bias_correction2_sqrt, grad_scale.double(), found_inf.double()]).float()


def adamw_master_ref(p, g, m, v, copy, scalars, beta1: float, beta2: float, weight_decay: float, eps: float, ema=None, ema_weight: float = 0.0) -> None:
    """PyTorch reference of adamw_master_ (the same maths in p's dtype: fp32, or fp64 for a float64 reference)."""
    lr, step_size, bc2_sqrt, grad_scale, found_inf = scalars.to(p.dtype).unbind()
    skip = found_inf != 0
    g = g.to(p.dtype) / grad_scale
    new_p = p - lr * weight_decay * p
    new_m = beta1 * m + (1 - beta1) * g
    new_v = beta2 * v + (1 - beta2) * g * g
    new_p = new_p - step_size * new_m / (new_v.sqrt() / bc2_sqrt + eps)
    if ema is not None:
        ema.copy_(torch.where(skip, ema, ema + ema_weight * (new_p - ema)))
    for t, new in ((p, new_p), (m, new_m), (v, new_v)):
        t.copy_(torch.where(skip, t, new))
    copy.copy_(p)


def adamw_master_(p, g, m, v, copy, scalars, beta1: float, beta2: float, weight_decay: float, eps: float, ema=None, ema_weight: float = 0.0) -> None:
    """One AdamW step, in place, of fp32 master p and moments m, v from gradient g; writes p into copy (e.g. bf16).
    ema (fp32, like p): also ema += ema_weight * (new p - ema), the EMA update (ema_weight = 1 - decay) in the same pass."""
    contiguous = all(t.is_contiguous() for t in (p, g, m, v, copy) + (() if ema is None else (ema,)))
    if not is_available(p) or p.dtype != torch.float32 or copy.dtype != torch.bfloat16 or not contiguous:
        return adamw_master_ref(p, g, m, v, copy, scalars, beta1, beta2, weight_decay, eps, ema, ema_weight)
    _ops.adamw_master_(p, g, m, v, copy, scalars, beta1, beta2, weight_decay, eps, ema, ema_weight)
