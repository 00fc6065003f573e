"""Training FLOPs of a DiT/VDiT, counted like DiT's paper (multiply-adds of the matmuls), for MFU."""
import math

import torch.nn as nn


def num_tokens(model: nn.Module) -> int:
    """Tokens per sample: the patch grid of the latent (VDiT: frames x height x width)."""
    grid = getattr(model, "grid", None)
    if grid is not None:  # VDiT: (t, h, w)
        return math.prod(grid)
    return (model.input_size // model.patch_size) ** 2


def forward_macs_per_sample(model: nn.Module) -> int:
    """Multiply-adds of one forward pass: per block qkv + proj + MLP (12 D^2 per token), attention scores and
    values (2 N^2 D) and adaLN (6 D^2); plus the patch embedding and the final layer."""
    n, d, depth = num_tokens(model), model.hidden_size, len(model.blocks)
    patch = model.patch_numel
    blocks = depth * (n * 12 * d * d + 2 * n * n * d + 6 * d * d)
    ends = n * patch * model.in_channels * d + 2 * d * d + n * d * patch * model.out_channels
    return blocks + ends


def train_flops_per_sample(model: nn.Module) -> int:
    """FLOPs of one training sample: 2 per multiply-add, x3 for forward + backward (711.8 G for DiT-XL/2 at 256)."""
    return 6 * forward_macs_per_sample(model)
