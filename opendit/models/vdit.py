"""VDiT: DiT on video latents, with 3-D patches and spatial (2-D) plus temporal (1-D) sin-cos positions."""
from typing import Tuple, Union

import torch
import torch.nn as nn

from opendit.models.dit import DIT_SIZES, DiT
from opendit.models.embed import PatchEmbed3D
from opendit.models.pos_embed import get_1d_sincos_pos_embed, get_2d_sincos_pos_embed


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class VDiT(DiT):
    """DiT over (N, C, T, H, W) video latents; tokens are ordered (t, h, w)."""

    def __init__(
        self,
        input_size: Union[int, Tuple[int, int]] = 32,
        patch_size: Tuple[int, int, int] = (1, 2, 2),
        num_frames: int = 16,
        **kwargs,
    ):
        self.num_frames = num_frames
        self.spatial_size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        super().__init__(input_size=input_size, patch_size=tuple(patch_size), **kwargs)

    @property
    def patch_numel(self) -> int:
        pt, ph, pw = self.patch_size
        return pt * ph * pw

    @property
    def grid(self) -> Tuple[int, int, int]:
        """Token grid (t, h, w) after padding to whole patches."""
        pt, ph, pw = self.patch_size
        H, W = self.spatial_size
        return _ceil_div(self.num_frames, pt), _ceil_div(H, ph), _ceil_div(W, pw)

    def build_patch_embedder(self) -> nn.Module:
        return PatchEmbed3D(self.patch_size, self.in_channels, self.hidden_size, bias=True)

    def build_pos_embed(self) -> None:
        t, h, w = self.grid
        self.register_buffer("pos_embed_spatial", torch.zeros(1, h * w, self.hidden_size), persistent=False)
        self.register_buffer("pos_embed_temporal", torch.zeros(1, t, self.hidden_size), persistent=False)

    def init_pos_embed(self) -> None:
        t, h, w = self.grid
        spatial = get_2d_sincos_pos_embed(self.hidden_size, (h, w))
        temporal = get_1d_sincos_pos_embed(self.hidden_size, t)
        self.pos_embed_spatial.copy_(torch.from_numpy(spatial).float().unsqueeze(0))
        self.pos_embed_temporal.copy_(torch.from_numpy(temporal).float().unsqueeze(0))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        N, _, T, H, W = x.shape
        if (T, H, W) != (self.num_frames, *self.spatial_size):
            raise ValueError(f"VDiT was built for (T, H, W) = {(self.num_frames, *self.spatial_size)}, got {(T, H, W)}")
        t, h, w = self.grid
        x = self.x_embedder(x).reshape(N, t, h * w, self.hidden_size)  # (N, t, h*w, D)
        x = x + self.pos_embed_spatial.unsqueeze(1).to(x.dtype)  # same spatial table on every frame
        x = x + self.pos_embed_temporal.unsqueeze(2).to(x.dtype)  # same temporal table at every location
        return x.reshape(N, t * h * w, self.hidden_size)  # (N, T, D)

    def unpatchify(self, x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """(N, t*h*w, pt*ph*pw*C) tokens -> (N, C, T, H, W) video, cropping any padding."""
        c, (pt, ph, pw), (t, h, w) = self.out_channels, self.patch_size, self.grid
        x = x.reshape(x.shape[0], t, h, w, pt, ph, pw, c)
        x = torch.einsum("nthwopqc->nctohpwq", x)  # (N, C, t, pt, h, ph, w, pw)
        x = x.reshape(x.shape[0], c, t * pt, h * ph, w * pw)
        T, H, W = shape[2:]
        if x.shape[2:] != (T, H, W):
            x = x[:, :, :T, :H, :W].contiguous()  # the padding cropped
        return x  # not a view: FSDP2 warns on a wrapped model's view output (fp32, where .float() returns it)


def _config(depth: int, hidden_size: int, num_heads: int, patch_size: Tuple[int, int, int]):
    def build(**kwargs) -> VDiT:  # keyword arguments may override the size
        return VDiT(**{"depth": depth, "hidden_size": hidden_size, "patch_size": patch_size, "num_heads": num_heads, **kwargs})

    return build


VDIT_PATCHES = {"1x2x2": (1, 2, 2), "2x2x2": (2, 2, 2)}

VDiT_models = {
    f"VDiT-{size}/{name}": _config(depth, hidden, heads, patch)
    for size, (depth, hidden, heads) in DIT_SIZES.items()
    for name, patch in VDIT_PATCHES.items()
}
