"""AdamW on fp32 master weights that also writes their bf16 copies, in one pass per tensor.

The maths is torch's fused AdamW (its order of operations): g = grad / grad_scale; p -= lr * wd * p;
m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2; p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps); copy = p rounded
to nearest even, as autocast's cast rounds (other copy dtypes take the reference). A step with found_inf != 0 reads
and writes nothing. It reads a bf16 gradient (2 bytes) where torch's fused AdamW reads an fp32 one and, given a
grad_scale, writes it back unscaled: 28 bytes per parameter instead of 32, the copy included. Without triton, or off
CUDA (unless TRITON_INTERPRET=1 at import), the PyTorch reference runs. Given the fp32 EMA of p, the pass also moves
it towards the new p (8 bytes a parameter, where a separate EMA update reads p again: 12). MultiTensorAdamW runs
the same pass over many tensors in one launch (a model's small weights, one launch each, ran below the bandwidth).
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


def _kernel_takes(p, g, m, v, copy, ema) -> bool:
    """Whether the Triton kernel takes these (else the reference runs): kernels here, fp32 p, bf16 copy, all contiguous."""
    every = (p, g, m, v, copy) + (() if ema is None else (ema,))
    return is_available(p) and p.dtype == torch.float32 and copy.dtype == torch.bfloat16 and all(t.is_contiguous() for t in every)


def adamw_master_(p, g, m, v, copy, scalars, beta1: float, beta2: float, weight_decay: float, eps: float, ema=None, ema_weight: float = 0.0) -> None:
    """One AdamW step, in place, of fp32 master p and moments m, v from gradient g; writes p into copy (e.g. bf16).
    ema (fp32, like p): also ema += ema_weight * (new p - ema), the EMA update (ema_weight = 1 - decay) in the same pass."""
    if not _kernel_takes(p, g, m, v, copy, ema):
        return adamw_master_ref(p, g, m, v, copy, scalars, beta1, beta2, weight_decay, eps, ema, ema_weight)
    _ops.adamw_master_(p, g, m, v, copy, scalars, beta1, beta2, weight_decay, eps, ema, ema_weight)


def adamw_each_(tensors: list, scalars, beta1: float, beta2: float, weight_decay: float, eps: float, ema_weight: float = 0.0) -> None:
    """adamw_master_ on each (p, g, m, v, copy, ema or None) of tensors, one launch each."""
    for p, g, m, v, copy, ema in tensors:
        adamw_master_(p, g, m, v, copy, scalars, beta1, beta2, weight_decay, eps, ema, ema_weight)


class MultiTensorAdamW:
    """adamw_master_ over a fixed list of tensor sizes in one launch per call (two when some sizes are not multiples of
    16: those take the kernel's unvectorized variant, the rest keep the vectorized one). Which block of which tensor
    each program updates is fixed by the sizes; the tensors' addresses go to a device table at every call, except in a
    call being captured into a CUDA graph: nothing runs then, so that call reads a table of its own (when the graph
    replays; eager calls afterwards leave it alone) that commit() fills once the capture has ended. One graph per
    instance: a second capture takes that table over."""

    def __init__(self, sizes: list, device: torch.device, block: int = 0, warps: int = 0):
        self.sizes = list(sizes)
        if not block:  # the per-weight kernel's (any value where there are no kernels: _fits refuses them)
            block, warps = _ops.adamw_block_size() if _ops is not None else (1024, 4)
        self.block, self.warps = block, warps
        self.parts = []  # (blocks, aligned): the sizes that are multiples of 16 (the kernel's vectorized variant), then the rest
        for aligned in (True, False):
            chosen = [i for i, n in enumerate(self.sizes) if (n % 16 == 0) == aligned]
            if chosen:
                counts = torch.tensor([-(-self.sizes[i] // self.block) for i in chosen])
                tensor_of = torch.repeat_interleave(torch.tensor(chosen), counts)
                block_of = torch.cat([torch.arange(c) for c in counts.tolist()])
                blocks = torch.stack([tensor_of, block_of], dim=1)  # (programs, 2): the tensor, its block
                self.parts.append((blocks.to(device=device, dtype=torch.int32), aligned))
        self.table = torch.zeros((len(self.sizes), 8), dtype=torch.int64, device=device)  # per tensor: 6 addresses, n, 0
        self.graph_table = torch.zeros_like(self.table)  # what a captured call reads
        self.pending = None  # the addresses of a captured call, for commit()

    def __call__(self, tensors: list, scalars, beta1: float, beta2: float, weight_decay: float, eps: float, ema_weight: float = 0.0) -> None:
        """tensors: per size given, (p, g, m, v, copy, ema or None) as adamw_master_ takes them (all with an EMA or none)."""
        if not self._fits(tensors):
            return adamw_each_(tensors, scalars, beta1, beta2, weight_decay, eps, ema_weight)
        rows = torch.tensor([[t.data_ptr() for t in (p, g, m, v, copy, p if ema is None else ema)] + [p.numel(), 0] for p, g, m, v, copy, ema in tensors])
        table = self.table
        if table.is_cuda and torch.cuda.is_current_stream_capturing():
            table, self.pending = self.graph_table, rows
        else:
            table.copy_(rows)
        has_ema = tensors[0][5] is not None
        for blocks, aligned in self.parts:
            _ops.adamw_multi_(table, blocks, scalars, beta1, beta2, weight_decay, eps, ema_weight, tensors[0][1].dtype, has_ema, self.block, self.warps, aligned)

    def commit(self) -> None:
        """After a CUDA-graph capture: the captured call's addresses into the table that the graph reads."""
        if self.pending is not None:
            self.graph_table.copy_(self.pending)
            self.pending = None

    def _fits(self, tensors: list) -> bool:
        """Whether the one-launch kernel can take these: as adamw_master_'s kernel, plus fp32 moments and EMAs, one
        gradient dtype, EMAs for all or none, the table's device and 16-byte aligned addresses."""
        if not tensors or [t[0].numel() for t in tensors] != self.sizes:
            return False
        g_dtype, has_ema = tensors[0][1].dtype, tensors[0][5] is not None
        for p, g, m, v, copy, ema in tensors:
            if not _kernel_takes(p, g, m, v, copy, ema) or (ema is not None) != has_ema or g.dtype != g_dtype:
                return False
            every = (p, g, m, v, copy) + ((ema,) if has_ema else ())
            if g_dtype not in (torch.bfloat16, torch.float16, torch.float32) or any(t.dtype != torch.float32 for t in (m, v) + every[5:]):
                return False
            if any(t.device != self.table.device or t.data_ptr() % 16 for t in every):
                return False
        return True
