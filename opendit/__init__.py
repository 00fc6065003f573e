"""OpenDiT: train and sample Diffusion Transformers for images and video."""
