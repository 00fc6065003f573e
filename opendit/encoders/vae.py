"""Frozen image VAE (Stable Diffusion KL autoencoder) or identity, for images and video.

Images are (N, C, H, W); videos are (N, C, T, H, W) and are encoded frame by frame,
at most ``chunk_size`` frames at a time so memory stays bounded.
"""

import os

import torch
from torch import nn

from .autoencoder_kl import CONFIG_NAME, WEIGHTS_NAMES, AutoencoderKL, KLConfig
from .hub import HUB_ID, load_local_or_hub

HUB_IDS = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}

TINY_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
)


class VAE(nn.Module):
    """Frozen wrapper exposing encode/decode to scaled latents; ``model=None`` is the identity."""

    def __init__(self, model: nn.Module | None = None, chunk_size: int = 16):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        if model is None:
            self.latent_channels, self.downsample = 3, 1
            self.scaling_factor, self.shift_factor = 1.0, 0.0
        else:
            cfg = model.config
            self.latent_channels = int(cfg.latent_channels)
            self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
            self.scaling_factor = float(getattr(cfg, "scaling_factor", None) or 0.18215)
            self.shift_factor = float(getattr(cfg, "shift_factor", None) or 0.0)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_config(cls, config: dict, chunk_size: int = 16) -> "VAE":
        """Build a randomly initialised ``AutoencoderKL`` from a config dict (no download)."""
        return cls(AutoencoderKL(KLConfig.from_dict(config)), chunk_size=chunk_size)

    def train(self, mode: bool = True) -> "VAE":
        """Stay in eval mode: the VAE is always frozen."""
        return super().train(False)

    @property
    def is_identity(self) -> bool:
        """True for the pixel-space ("none") encoder."""
        return self.model is None

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Move ``x`` to the model's device and dtype."""
        p = next(self.model.parameters())
        return x.to(device=p.device, dtype=p.dtype)

    def _frames(self, x: torch.Tensor, fn) -> torch.Tensor:
        """Apply ``fn`` to (N, C, H, W) or, folding frames into the batch, to (N, C, T, H, W), in chunks."""
        video = x.ndim == 5
        if video:
            b, c, t, h, w = x.shape
            x = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        elif x.ndim != 4:
            raise ValueError(f"expected (N, C, H, W) or (N, C, T, H, W), got shape {tuple(x.shape)}")
        step = max(1, self.chunk_size) if video else max(1, x.shape[0])
        out = torch.cat([fn(chunk) for chunk in x.split(step)])
        if video:
            out = out.reshape(b, t, *out.shape[1:]).permute(0, 2, 1, 3, 4)
        return out

    def _moments(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior mean and log-variance, concatenated on channels."""
        return self.model.encode(x)

    @torch.no_grad()
    def posterior(self, x: torch.Tensor) -> tuple:
        """Pixels in [-1, 1] -> the posterior's (mean, std), in the VAE's own (unscaled, unshifted) latent units."""
        mean, logvar = self._frames(self._prepare(x), self._moments).chunk(2, dim=1)
        return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))

    @torch.no_grad()
    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True) -> torch.Tensor:
        """Pixels in [-1, 1] -> posterior sample (mean if ``sample=False``) times ``scaling_factor``."""
        if self.is_identity:
            return x
        mean, std = self.posterior(x)
        z = mean
        if sample:
            device = generator.device if generator is not None else mean.device
            noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=device)
            z = mean + std * noise.to(mean.device)
        return (z - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents -> pixels in about [-1, 1] (inverse of :meth:`encode`)."""
        if self.is_identity:
            return z
        z = self._prepare(z) / self.scaling_factor + self.shift_factor
        return self._frames(z, self.model.decode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`encode`."""
        return self.encode(x)


def tiny_vae(chunk_size: int = 16, **overrides) -> VAE:
    """A tiny random KL VAE (4 latent channels, downsample 2 ** (len(block_out_channels) - 1)) for tests."""
    return VAE.from_config({**TINY_CONFIG, **overrides}, chunk_size=chunk_size)


def _download(repo: str, local_only: bool) -> str:
    """The hub snapshot folder holding repo's config.json and weights (the local cache only if local_only)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    folder = os.path.dirname(hf_hub_download(repo, CONFIG_NAME, local_files_only=local_only))
    for name in WEIGHTS_NAMES:
        try:
            hf_hub_download(repo, name, local_files_only=local_only)
            return folder
        except EntryNotFoundError:
            continue
    raise OSError(f"no {' or '.join(WEIGHTS_NAMES)} in {repo}")


def _load_autoencoder(path: str, label: str) -> AutoencoderKL:
    """The AutoencoderKL of a local folder (or its vae/ subfolder) or a hub id, the local cache first; one-line errors."""
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        if os.path.isfile(os.path.join(path, "vae", CONFIG_NAME)):
            path = os.path.join(path, "vae")  # a full diffusers pipeline folder
        else:
            raise ValueError(f"--vae {label}: no config.json in this folder (expected a diffusers AutoencoderKL)")
    local = os.path.isdir(path)
    return load_local_or_hub(lambda local_only: AutoencoderKL.from_pretrained(path if local else _download(path, local_only)), path, f"--vae {label}", "an AutoencoderKL")


def build_vae(name: str, device="cpu", dtype: torch.dtype = torch.float32, chunk_size: int = 16) -> VAE:
    """Build a frozen VAE from "none" (pixels), "ema", "mse", a local folder or a hub id."""
    name = str(name).strip()
    if name.lower() in ("none", ""):
        return VAE(None, chunk_size=chunk_size)
    path = HUB_IDS.get(name.lower(), os.path.expanduser(name))
    label = name if path == name else f"{name} ({path})"
    if not os.path.exists(path) and not HUB_ID.match(path):
        raise ValueError(f"--vae {label}: no such folder (use none, ema, mse, a local VAE folder or a hub id)")
    if os.path.isfile(path):
        raise ValueError(f"--vae {label}: is a file; pass the folder holding config.json and the weights")
    model = _load_autoencoder(path, label)
    return VAE(model.to(device=device, dtype=dtype), chunk_size=chunk_size)
