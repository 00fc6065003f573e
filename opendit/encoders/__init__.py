"""Frozen encoders: pixels to the latent space the DiT is trained in, prompts to pooled text embeddings."""
import torch

from opendit.errors import UsageError

from .text import TextEncoder, build_text_encoder, tiny_text_encoder
from .vae import VAE, build_vae, tiny_vae


def load_vae(name: str, device: torch.device) -> VAE:
    """The frozen VAE for --vae (none|ema|mse|PATH), with user-facing one-line errors."""
    try:
        return build_vae(name, device=device)
    except ValueError as e:
        raise UsageError(str(e)) from None


def load_text_encoder(name: str, device: torch.device) -> TextEncoder:
    """The frozen CLIP text encoder for --text_encoder (a hub id or a local folder), with one-line errors."""
    try:
        return build_text_encoder(name, device=device)
    except ValueError as e:
        raise UsageError(str(e)) from None


__all__ = ["VAE", "build_vae", "load_vae", "tiny_vae", "TextEncoder", "build_text_encoder", "load_text_encoder", "tiny_text_encoder"]
