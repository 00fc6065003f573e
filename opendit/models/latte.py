"""Latte: a video DiT whose blocks alternate attention inside each frame (spatial) and across frames (temporal).

Reference: Ma et al., "Latte: Latent Diffusion Transformer for Video Generation" (2024), in OpenDiT's variant: DiT's
embedders, blocks, final layer, conditioning and adaLN-Zero init; a 2-D sin-cos table added to every frame after the
patch embedding, a 1-D sin-cos table over frames added at the input of the first temporal block.

Between blocks the hidden state is kept as (N, t, s, D), s = h * w positions per frame, and each block regroups it
from its own shape: a spatial block to (N * t, s, D), a temporal one to (N * s, t, D). A block therefore computes the
right thing on any shard that holds whole frames (spatial) or whole position tracks (temporal), which is what lets
sequence parallelism (opendit/parallel/dsp.py) be applied from outside by hooks on the blocks and the final layer.
"""
from typing import List, Optional, Tuple

import torch

from opendit.models.blocks import DiTBlock, add_gated, norm_modulate
from opendit.models.dit import DIT_SIZES
from opendit.models.vdit import VDIT_PATCHES, VDiT

SPATIAL, TEMPORAL = "spatial", "temporal"


class LatteBlock(DiTBlock):
    """A DiT block over (N, t, s, D) tokens that attends within each frame (spatial) or at each position (temporal)."""

    kind: str = SPATIAL

    def forward(self, x: torch.Tensor, c: Optional[torch.Tensor], pos: Optional[torch.Tensor] = None, mod: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (N, t, s, D), possibly a shard of frames or positions; c: (N, D); pos: a table added to x first; mod:
        adaLN_modulation(c) (N, 6D) computed beforehand, used in place of c."""
        if pos is not None:
            x = x + pos.to(x.dtype)  # (1, t, 1, D): the temporal table, before the first temporal block
        N, t, s, D = x.shape
        if self.kind == SPATIAL:
            rows = x.reshape(N * t, s, D)  # (N*t, s, D): one frame per row
        else:
            rows = x.transpose(1, 2).reshape(N * s, t, D)  # (N*s, t, D): one position's track through time per row
        # The modulation is computed once per sample and repeated for its rows (the same as repeating c, cheaper).
        mod = (self.adaLN_modulation(c) if mod is None else mod).repeat_interleave(len(rows) // N, dim=0)  # (rows, 6D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        fused = self.kernels.fused_adaln
        rows = add_gated(rows, gate_msa, self.attn(norm_modulate(self.norm1, rows, shift_msa, scale_msa, fused)), fused)
        rows = add_gated(rows, gate_mlp, self.mlp(norm_modulate(self.norm2, rows, shift_mlp, scale_mlp, fused)), fused)
        # A new tensor, not a view of rows: FSDP2 warns on (and in-place ops would break) a wrapped module's view output.
        if self.kind == SPATIAL:
            return rows.view(N, t, s, D).clone()
        return rows.view(N, s, t, D).transpose(1, 2).contiguous()  # (N, t, s, D)


class Latte(VDiT):
    """VDiT with alternating spatial (even) and temporal (odd) blocks over (N, C, T, H, W) video latents."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # DiT built (and initialised) plain DiTBlocks; LatteBlock adds no parameters, so its construction order, init
        # and parameter names are kept and only the class changes.
        for i, block in enumerate(self.blocks):
            block.__class__ = LatteBlock
            block.kind = SPATIAL if i % 2 == 0 else TEMPORAL

    @property
    def block_kinds(self) -> List[str]:
        """"spatial" or "temporal" for each block, in order."""
        return [block.kind for block in self.blocks]

    @property
    def first_temporal(self) -> Optional[int]:
        """Index of the block whose input gets the temporal table (None for a model of one block)."""
        return next((i for i, kind in enumerate(self.block_kinds) if kind == TEMPORAL), None)

    @property
    def frames_positions(self) -> Tuple[int, int]:
        """(t, s): token frames and positions per frame of the full hidden state."""
        t, h, w = self.grid
        return t, h * w

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, T, H, W) -> (N, t, s, D) tokens plus the spatial table (the same on every frame)."""
        N, _, T, H, W = x.shape
        if (T, H, W) != (self.num_frames, *self.spatial_size):
            raise ValueError(f"Latte was built for (T, H, W) = {(self.num_frames, *self.spatial_size)}, got {(T, H, W)}")
        t, s = self.frames_positions
        x = self.x_embedder(x).reshape(N, t, s, self.hidden_size)  # (N, t, s, D)
        return x + self.pos_embed_spatial.unsqueeze(1).to(x.dtype)  # (1, 1, s, D) on every frame

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None, text: Optional[torch.Tensor] = None,
                modulation: Optional[torch.Tensor] = None):
        """Same contract as DiT.forward: (N, C, T, H, W) latents -> (N, out_channels, T, H, W) in fp32."""
        shape = x.shape
        x = self.embed(x.to(self.x_embedder.proj.weight.dtype))  # (N, t, s, D)
        c, mods = self.conditioning(t, y, text, modulation)
        temporal_pos = self.pos_embed_temporal.unsqueeze(2)  # (1, t, 1, D)
        for i, (block, mod) in enumerate(zip(self.blocks, mods)):
            x = block(x, c, temporal_pos if i == self.first_temporal else None, mod)  # (N, t, s, D)
        x = self.final_layer(x.flatten(1, 2), c, mods[-1])  # (N, t*s, patch_numel * out_channels), tokens ordered (t, h, w)
        return self.unpatchify(x, shape).float()  # (N, out_channels, T, H, W)


def _config(depth: int, hidden_size: int, num_heads: int, patch_size: Tuple[int, int, int]):
    def build(**kwargs) -> Latte:  # keyword arguments may override the size
        return Latte(**{"depth": depth, "hidden_size": hidden_size, "patch_size": patch_size, "num_heads": num_heads, **kwargs})

    return build


Latte_models = {
    f"Latte-{size}/{name}": _config(depth, hidden, heads, patch)
    for size, (depth, hidden, heads) in DIT_SIZES.items()
    for name, patch in VDIT_PATCHES.items()
}
