"""The denoising loop: DDPM, DDIM or DPM-Solver from noise, with classifier-free guidance."""
import argparse
from typing import Optional

import torch

from opendit.diffusion import create_diffusion

SAMPLERS = ("ddpm", "ddim", "dpm-solver")



def denoise(
    args: argparse.Namespace,
    model: torch.nn.Module,
    z: torch.Tensor,
    y: Optional[torch.Tensor],
    text: Optional[torch.Tensor] = None,
    null_text: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Run the chosen sampler from noise z with labels y and/or pooled prompts text; when cfg_scale > 1, guide
    against the null class and the empty prompt's embedding null_text (1, text_dim)."""
    use_cfg = args.cfg_scale > 1.0
    if use_cfg:
        z = torch.cat([z, z], dim=0)
        if y is not None:
            y = torch.cat([y, torch.full_like(y, args.num_classes)], dim=0)  # the null class is num_classes
        if text is not None:
            text = torch.cat([text, null_text.expand_as(text)], dim=0)  # the null prompt is ""
        model_kwargs = dict(y=y, text=text, cfg_scale=args.cfg_scale, cfg_channels=None if args.cfg_channels == "all" else 3)
        model_fn = model.forward_with_cfg
    else:
        model_kwargs = dict(y=y, text=text)
        model_fn = model.forward
    if args.sampler == "ddpm":
        diffusion = create_diffusion(str(args.num_sampling_steps), noise_schedule=args.noise_schedule)
        samples = diffusion.p_sample_loop(model_fn, z.shape, z, clip_denoised=args.vae == "none", model_kwargs=model_kwargs, device=z.device, progress=True)
    elif args.sampler == "ddim":
        diffusion = create_diffusion(f"ddim{args.num_sampling_steps}", noise_schedule=args.noise_schedule)
        samples = diffusion.ddim_sample_loop(model_fn, z.shape, z, clip_denoised=args.vae == "none", model_kwargs=model_kwargs, device=z.device, progress=True)
    else:
        diffusion = create_diffusion("", noise_schedule=args.noise_schedule)
        samples = diffusion.dpm_solver_sample_loop(model_fn, z.shape, num_steps=args.num_sampling_steps, noise=z, model_kwargs=model_kwargs, device=z.device, progress=True)
    return samples.chunk(2, dim=0)[0] if use_cfg else samples
