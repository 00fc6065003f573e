"""Embedders: timesteps, class labels and patches (2-D images, 3-D videos)."""
import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

_FREQUENCIES = {}  # (half, max_period, device) -> frequencies: a host-to-device copy per call would stall the GPU queue


def _frequencies(half: int, max_period: int, device: torch.device) -> torch.Tensor:
    """exp(-log(max_period) * i / half), computed on the CPU (as DiT does, so values match bit for bit) and copied once per device."""
    key = (half, max_period, str(device))
    if key not in _FREQUENCIES:
        _FREQUENCIES[key] = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half).to(device)
    return _FREQUENCIES[key]


class TimestepEmbedder(nn.Module):
    """Embeds scalar diffusion timesteps into vectors: a 256-d sinusoid followed by an MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
        """(N,) timesteps, possibly fractional -> (N, dim) features [cos | sin] in fp32."""
        half = dim // 2
        args = t[:, None].float() * _frequencies(half, max_period, t.device)[None]  # (N, half)
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (N, D)


class LabelEmbedder(nn.Module):
    """Embeds class labels; label dropout (to the extra null row) enables classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Replace a random 10% (dropout_prob) of labels, or those where force_drop_ids == 1, by the null class."""
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)  # (N, D)


class PatchEmbed(nn.Module):
    """(N, C, H, W) image -> (N, T, D) tokens by a p x p convolution with stride p (timm's PatchEmbed layout)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, bias: bool = True):
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (N, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (N, T, D), tokens in row-major order


class PatchEmbed3D(nn.Module):
    """(N, C, T, H, W) video -> (N, t*h*w, D) tokens by a Conv3d with kernel = stride = patch; right-pads to fit."""

    def __init__(self, patch_size: Tuple[int, int, int], in_chans: int, embed_dim: int, bias: bool = True):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pt, ph, pw = self.patch_size
        _, _, T, H, W = x.shape
        pad = (0, -W % pw, 0, -H % ph, 0, -T % pt)
        if any(pad):
            x = F.pad(x, pad)
        x = self.proj(x)  # (N, D, t, h, w)
        return x.flatten(2).transpose(1, 2)  # (N, t*h*w, D), tokens ordered (t, h, w)
