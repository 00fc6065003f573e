"""Fast sampling with DPM-Solver++(2M) through diffusers' DPMSolverMultistepScheduler."""

from __future__ import annotations

import warnings

import numpy as np
import torch as th

from .gaussian_diffusion import get_named_beta_schedule


def make_dpm_solver_scheduler(betas: np.ndarray):
    """A diffusers DPM-Solver++ (order 2, eps-prediction) scheduler on our float64 betas."""
    from diffusers import DPMSolverMultistepScheduler

    betas = np.asarray(betas, dtype=np.float64)
    return DPMSolverMultistepScheduler(
        num_train_timesteps=len(betas),
        trained_betas=betas.tolist(),
        algorithm_type="dpmsolver++",
        solver_order=2,
        prediction_type="epsilon",
    )


def dpm_solver_sample_loop(model, shape, num_steps=25, noise=None, model_kwargs=None, device=None,
                           progress=False, betas=None):
    """Sample x_0 in `num_steps` DPM-Solver++ steps and return it.

    `model(x, t, **model_kwargs)` gets integer timesteps of the original schedule (a LongTensor
    of shape (B,)). If it returns 2C channels (learned sigma), only the first C (eps) are used;
    a tuple output uses its first element. `betas` defaults to the 1000-step linear schedule.
    """
    model_kwargs = {} if model_kwargs is None else model_kwargs
    assert isinstance(shape, (tuple, list))
    if betas is None:
        betas = get_named_beta_schedule("linear", 1000)
    if device is None:
        device = noise.device if noise is not None else th.device("cpu")

    scheduler = make_dpm_solver_scheduler(betas)
    with warnings.catch_warnings():
        # diffusers builds its sigma table with np.array(tensor), which NumPy 2 flags as deprecated.
        warnings.simplefilter("ignore", DeprecationWarning)
        scheduler.set_timesteps(num_steps, device=device)
    x = noise if noise is not None else th.randn(*shape, device=device)
    x = x * scheduler.init_noise_sigma
    channels = x.shape[1]

    timesteps = scheduler.timesteps
    if progress:
        from tqdm.auto import tqdm

        timesteps = tqdm(timesteps)
    for step in timesteps:
        t = th.full((x.shape[0],), int(step), dtype=th.long, device=device)
        with th.no_grad():
            out = model(x, t, **model_kwargs)
            if isinstance(out, tuple):
                out = out[0]
            if out.shape[1] == 2 * channels:
                out = out[:, :channels]
            x = scheduler.step(out, step, x).prev_sample
    return x
