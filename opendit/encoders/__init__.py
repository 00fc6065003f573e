"""Frozen encoders: pixels to the latent space the DiT is trained in, prompts to pooled text embeddings."""

from .text import TextEncoder, build_text_encoder, tiny_text_encoder
from .vae import VAE, build_vae, tiny_vae

__all__ = ["VAE", "build_vae", "tiny_vae", "TextEncoder", "build_text_encoder", "tiny_text_encoder"]
