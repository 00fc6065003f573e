"""Frozen encoders that map pixels to the latent space the DiT is trained in."""

from .vae import VAE, build_vae, tiny_vae

__all__ = ["VAE", "build_vae", "tiny_vae"]
