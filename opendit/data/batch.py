"""A collated batch -> what diffusion.training_losses takes: latents and model_kwargs (y, text)."""

from typing import Optional

import torch

TEXT_DROP_PROB = 0.1  # captions replaced by the empty prompt, for classifier-free guidance (OpenDiT, DiT's labels)


def _draw_device(generator: Optional[torch.Generator], default) -> torch.device:
    return generator.device if generator is not None else torch.device(default)


def prepare_batch(batch: dict, vae, text_encoder, device: torch.device, train: bool,
                  generator: Optional[torch.Generator] = None) -> tuple:
    """(x, model_kwargs): pixels encoded with the VAE (a latent cache's stored posterior sampled the same way),
    "y" for labelled data, "text" (N, text_dim) pooled caption embeddings when a text encoder is given.

    Random draws (VAE posterior noise, then the 10% caption drop when `train`) come from `generator`, or the global
    RNG when it is None, so that a resumed run replays them exactly.
    """
    x = batch["x"].to(device, non_blocking=True)
    if "x_std" in batch:  # a latent cache holds the scaled posterior mean and std: draw as vae.encode does
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=_draw_device(generator, x.device))
        x = x + batch["x_std"].to(device, non_blocking=True) * noise.to(device)
    else:
        with torch.no_grad():
            x = vae.encode(x, generator=generator)  # scaled latents (pixels unchanged for --vae none)
    model_kwargs = {}
    if "y" in batch:
        model_kwargs["y"] = batch["y"].to(device, non_blocking=True)
    if text_encoder is not None and ("text" in batch or "text_emb" in batch):
        drop = torch.zeros(len(x), dtype=torch.bool)
        if train:
            drop = (torch.rand(len(x), generator=generator, device=_draw_device(generator, "cpu")) < TEXT_DROP_PROB).cpu()
        if "text_emb" in batch:  # a latent cache's pooled caption embeddings; dropped ones become the null prompt's
            text = batch["text_emb"].to(device, non_blocking=True).float()
            if drop.any():  # torch.where, from a pinned copy of the mask: no host-device synchronisation
                mask = drop.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else drop
                text = torch.where(mask[:, None], text_encoder.null_embedding().to(device, text.dtype), text)
        else:
            with torch.no_grad():
                text = text_encoder.encode(["" if d else caption for d, caption in zip(drop.tolist(), batch["text"])])
        model_kwargs["text"] = text.to(device)
    return x, model_kwargs
