"""Gaussian diffusion for DiT: schedules, losses and samplers (DDPM, DDIM, DPM-Solver)."""

from . import gaussian_diffusion as gd
from .dpm_solver import dpm_solver_sample_loop
from .gaussian_diffusion import GaussianDiffusion, LossType, ModelMeanType, ModelVarType, get_named_beta_schedule
from .respace import SpacedDiffusion, space_timesteps
from .timestep_sampler import (
    LossAwareSampler,
    LossSecondMomentResampler,
    ScheduleSampler,
    UniformSampler,
    create_named_schedule_sampler,
)

__all__ = [
    "create_diffusion",
    "GaussianDiffusion",
    "SpacedDiffusion",
    "ModelMeanType",
    "ModelVarType",
    "LossType",
    "get_named_beta_schedule",
    "space_timesteps",
    "dpm_solver_sample_loop",
    "ScheduleSampler",
    "UniformSampler",
    "LossAwareSampler",
    "LossSecondMomentResampler",
    "create_named_schedule_sampler",
]


def create_diffusion(
    timestep_respacing,
    noise_schedule="linear",
    use_kl=False,
    sigma_small=False,
    predict_xstart=False,
    learn_sigma=True,
    rescale_learned_sigmas=False,
    diffusion_steps=1000,
    snr_gamma=0.0,
):
    """Build a (possibly respaced) diffusion with DiT's defaults: linear betas, eps-prediction, learned range variance."""
    betas = gd.get_named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]

    if learn_sigma:
        var_type = gd.ModelVarType.LEARNED_RANGE
    elif sigma_small:
        var_type = gd.ModelVarType.FIXED_SMALL
    else:
        var_type = gd.ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(diffusion_steps, timestep_respacing),
        betas=betas,
        model_mean_type=gd.ModelMeanType.START_X if predict_xstart else gd.ModelMeanType.EPSILON,
        model_var_type=var_type,
        loss_type=loss_type,
        snr_gamma=snr_gamma,
    )
