"""DiT: a class- and/or text-conditional Diffusion Transformer over image latents (Peebles & Xie, 2023).

Parameter names, shapes, initialisation and maths follow Meta's DiT, so its official checkpoints load with
strict=True and give the same outputs. The file holds no distributed code: parallelism is applied from outside.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from opendit.models.blocks import DiTBlock, FinalLayer, KernelChoice
from opendit.models.embed import LabelEmbedder, PatchEmbed, TimestepEmbedder
from opendit.models.pos_embed import get_2d_sincos_pos_embed


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone and adaLN-Zero conditioning."""

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        text_dim: int = 0,
    ):
        super().__init__()
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.input_size = input_size
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.text_dim = text_dim

        # Construction order matches DiT, so a seeded init draws the same numbers.
        self.x_embedder = self.build_patch_embedder()
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes > 0 else None
        self.build_pos_embed()
        self.kernels = KernelChoice()  # one switch for every block and the final layer (opendit.parallel.parallelize)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio, kernels=self.kernels) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, self.patch_numel, self.out_channels, kernels=self.kernels)
        # Pooled text (CLIP's EOS state) -> D, added to c; none when text_dim=0, so such a model is exactly DiT.
        self.text_embedder = nn.Linear(text_dim, hidden_size) if text_dim > 0 else None
        self.initialize_weights()

    # --- geometry hooks (VDiT overrides these) ---
    @property
    def patch_numel(self) -> int:
        return self.patch_size**2

    def build_patch_embedder(self) -> nn.Module:
        if self.input_size % self.patch_size:
            raise ValueError(f"input size {self.input_size} is not divisible by patch size {self.patch_size}")
        return PatchEmbed(self.input_size, self.patch_size, self.in_channels, self.hidden_size, bias=True)

    def build_pos_embed(self) -> None:
        # Will use fixed sin-cos embedding:
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, self.hidden_size), requires_grad=False)

    def init_pos_embed(self) -> None:
        grid = int(self.x_embedder.num_patches**0.5)
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid)
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.x_embedder(x) + self.pos_embed  # (N, T, D), where T = H * W / patch_size ** 2

    def unpatchify(self, x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """(N, T, p * p * C) tokens -> (N, C, H, W) images."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        assert h * w == x.shape[1]
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    # --- initialisation ---
    def initialize_weights(self) -> None:
        """adaLN-Zero init: Xavier linears, sin-cos positions, N(0, 0.02) embeddings, zeroed modulation and output."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)  # the text embedder included: Xavier weight, zero bias

        # Initialize (and freeze) the position table by sin-cos embedding:
        self.init_pos_embed()

        # Initialize the patch embedding like nn.Linear (instead of nn.Conv):
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        # Initialize the label embedding table and the timestep MLP:
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # Zero-out adaLN modulation layers, so every block starts as the identity:
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)

        # Zero-out output layers:
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    # --- forward ---
    def condition(self, t: torch.Tensor, y: Optional[torch.Tensor], text: Optional[torch.Tensor]) -> torch.Tensor:
        """c = t_emb (+ y_emb for class labels) (+ text_emb for pooled prompt embeddings)."""
        c = self.t_embedder(t)  # (N, D)
        if y is not None:
            if self.y_embedder is None:
                raise ValueError("this model was built with num_classes=0 and takes no class labels")
            c = c + self.y_embedder(y, self.training)  # (N, D)
        if text is not None:
            if self.text_embedder is None:
                raise ValueError("this model was built with text_dim=0 and takes no text embeddings")
            c = c + self.text_embedder(text.to(self.text_embedder.weight.dtype))  # (N, D)
        return c

    def adaln_layers(self) -> List[nn.Module]:
        """Every block's adaLN_modulation (SiLU, Linear to 6D) and the final layer's (to 2D), in order."""
        return [layer.adaLN_modulation for layer in (*self.blocks, self.final_layer)]

    def modulation_widths(self) -> List[int]:
        """The widths of every block's adaLN output (6D) and the final layer's (2D), in order."""
        return [layer[-1].out_features for layer in self.adaln_layers()]

    def modulations(self, c: torch.Tensor) -> torch.Tensor:
        """Every block's and the final layer's adaLN_modulation(c), side by side: (N, D) -> (N, depth * 6D + 2D).
        forward(..., modulation=) takes them in place of t, y and text (sampling computes a schedule's at once)."""
        layers, widths, out, start = self.adaln_layers(), self.modulation_widths(), None, 0
        for layer, width in zip(layers, widths):
            mod = layer(c)  # (N, width), in the autocast dtype under autocast
            out = mod.new_empty(len(c), sum(widths)) if out is None else out  # filled in place: no concatenated copy
            out[:, start : start + width] = mod
            start += width
        return out

    def conditioning(self, t, y, text, modulation: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], List[Optional[torch.Tensor]]]:
        """(c, one adaLN output or None per block and the final layer): c from t, y, text, or modulation's views."""
        if modulation is None:
            return self.condition(t, y, text), [None] * (len(self.blocks) + 1)  # (N, D)
        return None, list(modulation.split(self.modulation_widths(), dim=1))  # (N, 6D) per block, (N, 2D)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None, text: Optional[torch.Tensor] = None,
                modulation: Optional[torch.Tensor] = None):
        """
        x: (N, C, H, W) latents (VDiT: (N, C, T, H, W)); t: (N,) timesteps; y: (N,) class labels;
        text: (N, text_dim) pooled prompt embeddings (models built with text_dim > 0);
        modulation: (N, depth * 6D + 2D) = self.modulations(c) computed beforehand, used in place of t, y and text.
        Returns (N, out_channels, ...) in fp32: eps, then the learned-sigma interpolation when learn_sigma.
        """
        shape = x.shape
        x = self.embed(x.to(self.x_embedder.proj.weight.dtype))  # (N, T, D)
        if self.kernels.low_precision_residual and torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))  # the residual stream in bf16: half the bytes per add
        c, mods = self.conditioning(t, y, text, modulation)
        if self.kernels.fused_adaln and self.kernels.fused_boundaries:
            x = self.blocks_fused_boundaries(x, c, mods)
        else:
            for block, mod in zip(self.blocks, mods):
                x = block(x, c, mod)  # (N, T, D); sequence parallelism (applied from outside) splits T at the first block
            x = self.final_layer(x, c, mods[-1])  # (N, T, patch_numel * out_channels), gathered again under sequence parallelism
        return self.unpatchify(x, shape).float()  # (N, out_channels, ...)

    def layer_modulations(self, c: torch.Tensor) -> List[torch.Tensor]:
        """Every block's and the final layer's adaLN_modulation(c): (N, 6D) per block, then (N, 2D), as one GEMM over
        their stacked weights (depth + 1 small GEMMs forward and backward would each wait on its launch)."""
        layers = self.adaln_layers()
        if not all(type(layer[0]) is nn.SiLU and type(layer[-1]) is nn.Linear for layer in layers):  # e.g. float8 linears
            return [layer(c) for layer in layers]
        weight = torch.cat([layer[-1].weight for layer in layers])  # (depth * 6D + 2D, D)
        bias = torch.cat([layer[-1].bias for layer in layers])  # (depth * 6D + 2D,)
        return list(F.linear(F.silu(c), weight, bias).split(self.modulation_widths(), dim=1))  # (N, 6D) per block, (N, 2D)

    def blocks_fused_boundaries(self, x: torch.Tensor, c: Optional[torch.Tensor], mods: list) -> torch.Tensor:
        """The blocks and the final layer, each block handing the next its LayerNorm + modulate of the residual stream
        (KernelChoice.fused_boundaries: one process or DDP, no sequence parallelism or recomputation)."""
        mods = self.layer_modulations(c) if mods[0] is None else mods  # (N, 6D) per block, (N, 2D)
        h = None
        for block, mod, next_mod in zip(self.blocks, mods, mods[1:]):
            x, h = block(x, None, mod, h=h, next_mod=next_mod)  # (N, T, D) each
        return self.final_layer(x, None, mods[-1], h=h)  # (N, T, patch_numel * out_channels)

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: Optional[torch.Tensor] = None,
        cfg_scale: float = 1.0,
        text: Optional[torch.Tensor] = None,
        cfg_channels: Optional[int] = 3,
    ) -> torch.Tensor:
        """
        Classifier-free guidance on a batch whose second half carries the null condition: the null class in y
        and/or the empty prompt's embedding in text.
        cfg_channels=3 guides the first three eps channels only, as DiT does (its published numbers use this);
        cfg_channels=None guides all in_channels eps channels.
        """
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        model_out = self.forward(combined, t, y, text)
        guided = self.in_channels if cfg_channels is None else cfg_channels
        eps, rest = model_out[:, :guided], model_out[:, guided:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)


#################################################################################
#                                   DiT Configs                                  #
#################################################################################


def _config(depth: int, hidden_size: int, num_heads: int, patch_size: int):
    def build(**kwargs) -> DiT:  # keyword arguments may override the size (e.g. depth=4 for a tiny model)
        return DiT(**{"depth": depth, "hidden_size": hidden_size, "patch_size": patch_size, "num_heads": num_heads, **kwargs})

    return build


# name -> (depth, hidden size, heads); each comes with patch sizes 2, 4 and 8.
DIT_SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}

DiT_image_models = {
    f"DiT-{size}/{p}": _config(depth, hidden, heads, p) for size, (depth, hidden, heads) in DIT_SIZES.items() for p in (2, 4, 8)
}
