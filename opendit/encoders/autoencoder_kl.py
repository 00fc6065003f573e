"""The KL autoencoder of latent diffusion (Stable Diffusion's VAE), in diffusers' AutoencoderKL layout.

config.json and the parameter names are diffusers', so its folders and hub repos (sd-vae-ft-ema / -mse, SDXL's and
SD3's VAEs) load here as they are and the folders written here load in diffusers. It exists because importing
diffusers costs seconds before anything runs (its package imports torch._dynamo and every model it has: 11-14 s of
a 23 s `python sample.py` on the H200 host, docs/benchmarks.md); this file needs torch alone.
"""
import json
import os
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .hub import one_line

CONFIG_NAME = "config.json"
WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}  # diffusers < 0.14 files


@dataclass
class KLConfig:
    """The fields of an AutoencoderKL config.json that shape the network or its latents (diffusers' defaults)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    act_fn: str = "silu"
    down_block_types: Optional[tuple] = None
    up_block_types: Optional[tuple] = None

    def __post_init__(self):
        n = len(self.block_out_channels)
        self.block_out_channels = tuple(self.block_out_channels)
        self.down_block_types = tuple(self.down_block_types or ("DownEncoderBlock2D",) * n)
        self.up_block_types = tuple(self.up_block_types or ("UpDecoderBlock2D",) * n)
        if self.act_fn != "silu":
            raise ValueError(f"act_fn {self.act_fn!r} is not supported (silu only)")
        for key, kinds, kind in (("down_block_types", self.down_block_types, "DownEncoderBlock2D"), ("up_block_types", self.up_block_types, "UpDecoderBlock2D")):
            if len(kinds) != n or set(kinds) != {kind}:
                raise ValueError(f"{key} {list(kinds)} is not supported ({n} x {kind}, one per block_out_channels)")

    @classmethod
    def from_dict(cls, config: dict) -> "KLConfig":
        """From a parsed config.json: other fields (_class_name, force_upcast, latents_mean, ...) are ignored."""
        name = config.get("_class_name", "AutoencoderKL")
        if name != "AutoencoderKL":
            raise ValueError(f"config.json describes a {name}, not an AutoencoderKL")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in known and v is not None})

    def to_dict(self) -> dict:
        return {"_class_name": "AutoencoderKL", **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}}


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> 3x3 conv, twice, added to the input (through a 1x1 conv when the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=1e-6)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """One-head self-attention over all pixels, with a residual (the mid block's)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # diffusers' to_out.0 (its to_out.1 is a dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        q, k, v = (proj(tokens).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, H*W, C)
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (B, H*W, C)
        return x + self.to_out[0](out).transpose(1, 2).reshape(b, c, h, w)


class MidBlock(nn.Module):
    """ResNet, self-attention, ResNet, at the lowest resolution."""

    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([Attention(channels, groups)] if attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    """Pad right and bottom by one, then a stride-2 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class EncoderBlock(nn.Module):
    """An encoder stage: ResNets, then a downsample (none after the last stage)."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(layers)])
        self.downsamplers = nn.ModuleList([Downsample(out_channels)] if downsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in [*self.resnets, *self.downsamplers]:
            x = layer(x)
        return x


class DecoderBlock(nn.Module):
    """A decoder stage: ResNets, then an upsample (none after the last stage)."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(layers)])
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if upsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in [*self.resnets, *self.upsamplers]:
            x = layer(x)
        return x


class Encoder(nn.Module):
    """Pixels -> the posterior's mean and log-variance (2 x latent_channels), downsampling 2 ** (stages - 1)."""

    def __init__(self, cfg: KLConfig):
        super().__init__()
        ch, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            [EncoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, groups, downsample=i < len(ch) - 1) for i in range(len(ch))]
        )
        self.mid_block = MidBlock(ch[-1], groups, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    """Latents -> pixels, upsampling 2 ** (stages - 1)."""

    def __init__(self, cfg: KLConfig):
        super().__init__()
        ch, groups = cfg.block_out_channels[::-1], cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], groups, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            [DecoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, groups, upsample=i < len(ch) - 1) for i in range(len(ch))]
        )
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """encode: pixels -> (mean, log-variance) on channels; decode: latents -> pixels (latents unscaled)."""

    def __init__(self, config: KLConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        n = config.latent_channels
        self.quant_conv = nn.Conv2d(2 * n, 2 * n, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(n, n, 1) if config.use_post_quant_conv else None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        moments = self.encoder(x)  # (N, 2 * latent_channels, H / f, W / f)
        return moments if self.quant_conv is None else self.quant_conv(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z if self.post_quant_conv is None else self.post_quant_conv(z))

    @classmethod
    def from_pretrained(cls, folder: str) -> "AutoencoderKL":
        """A folder holding config.json and diffusion_pytorch_model.safetensors (or .bin); ValueError/OSError otherwise."""
        with open(os.path.join(folder, CONFIG_NAME)) as f:
            config = KLConfig.from_dict(json.load(f))
        state_dict = read_weights(folder)
        with torch.device("meta"):
            model = cls(config)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        missing, unexpected = sorted(expected.keys() - state_dict.keys()), sorted(state_dict.keys() - expected.keys())
        if missing or unexpected:
            raise ValueError(f"weights do not fit config.json ({len(missing)} missing, e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})")
        for k, shape in expected.items():
            if tuple(state_dict[k].shape) != shape:
                raise ValueError(f"weights do not fit config.json ({k}: {tuple(state_dict[k].shape)} in the file, {shape} by the config)")
        model.load_state_dict(state_dict, assign=True)
        return model

    def save_pretrained(self, folder: str) -> None:
        """config.json and diffusion_pytorch_model.safetensors, as diffusers writes them."""
        from safetensors.torch import save_file

        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, CONFIG_NAME), "w") as f:
            json.dump(self.config.to_dict(), f, indent=2)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, os.path.join(folder, WEIGHTS_NAMES[0]))


def read_weights(folder: str) -> dict:
    """The folder's state dict, with diffusers' pre-0.14 attention names (query, key, value, proj_attn) renamed."""
    paths = [os.path.join(folder, name) for name in WEIGHTS_NAMES if os.path.isfile(os.path.join(folder, name))]
    if not paths:
        raise FileNotFoundError(f"no {' or '.join(WEIGHTS_NAMES)} in {folder}")
    try:
        if paths[0].endswith(".safetensors"):
            from safetensors.torch import load_file

            state_dict = load_file(paths[0])
        else:
            state_dict = torch.load(paths[0], map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: safetensors raises its own error type
        raise ValueError(f"{paths[0]}: unreadable ({one_line(e)})") from None
    renamed = {}
    for key, value in state_dict.items():
        *path, name, kind = key.split(".")
        if name in OLD_ATTENTION_NAMES and "attentions" in path:
            key = ".".join([*path, OLD_ATTENTION_NAMES[name], kind])
            value = value.flatten(1) if value.ndim == 4 else value  # a 1x1 conv stored for a linear layer
        renamed[key] = value
    return renamed
