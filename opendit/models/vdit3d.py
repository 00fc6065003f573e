"""vDiT: OpenDiT's first video model (vDiT-XL/222), a VDiT with one frozen 3-D sin-cos position table.

The table is a frozen parameter named pos_embed (as in DiT, so it is in the state dict) over the (t, h, w) token grid:
a quarter of the channels encode the frame, three quarters the position in the frame (pos_embed.get_3d_sincos_pos_embed).
"""
import math
from typing import Tuple

import torch
import torch.nn as nn

from opendit.models.dit import DIT_SIZES
from opendit.models.pos_embed import get_3d_sincos_pos_embed
from opendit.models.vdit import VDiT


class VDiT3D(VDiT):
    """VDiT whose tokens get one 3-D sin-cos table instead of a spatial plus a temporal one."""

    def build_pos_embed(self) -> None:
        self.pos_embed = nn.Parameter(torch.zeros(1, math.prod(self.grid), self.hidden_size), requires_grad=False)

    def init_pos_embed(self) -> None:
        table = get_3d_sincos_pos_embed(self.hidden_size, self.grid)
        self.pos_embed.data.copy_(torch.from_numpy(table).float().unsqueeze(0))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        T, H, W = x.shape[2:]
        if (T, H, W) != (self.num_frames, *self.spatial_size):
            raise ValueError(f"vDiT was built for (T, H, W) = {(self.num_frames, *self.spatial_size)}, got {(T, H, W)}")
        return self.x_embedder(x) + self.pos_embed.to(x.dtype)  # (N, t*h*w, D)


def _config(depth: int, hidden_size: int, num_heads: int, patch_size: Tuple[int, int, int] = (2, 2, 2)):
    def build(**kwargs) -> VDiT3D:  # keyword arguments may override the size
        return VDiT3D(**{"depth": depth, "hidden_size": hidden_size, "patch_size": patch_size, "num_heads": num_heads, **kwargs})

    return build


# "222" is the seed's spelling of the (2, 2, 2) patch; both capitalisations of the name were in use.
VDiT3D_models = {
    f"{prefix}-{size}/222": _config(depth, hidden, heads) for prefix in ("vDiT", "VDiT") for size, (depth, hidden, heads) in DIT_SIZES.items()
}
