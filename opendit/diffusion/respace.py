"""Timestep respacing: run a diffusion trained on N steps with a subset of them."""

from __future__ import annotations

import numpy as np

from .gaussian_diffusion import GaussianDiffusion, _on_device


def space_timesteps(num_timesteps: int, section_counts) -> set[int]:
    """Choose which of the original timesteps to keep.

    `section_counts` is either "ddimN" (an evenly strided set of exactly N steps, as in DDIM)
    or a comma-separated string / list of counts: the timeline is cut into equal sections and
    each section keeps that many (evenly spaced, rounded) steps.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            wanted = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == wanted:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {wanted} steps with an integer stride")
        section_counts = [int(part) for part in section_counts.split(",")]

    n_sections = len(section_counts)
    base_size, remainder = divmod(num_timesteps, n_sections)
    kept = []
    section_start = 0
    for i, count in enumerate(section_counts):
        size = base_size + (1 if i < remainder else 0)
        if size < count:
            raise ValueError(f"cannot divide section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(section_start + round(position))
            position += stride
        section_start += size
    return set(kept)


class _WrappedModel:
    """Calls the model with original timesteps instead of compact (respaced) indices."""

    def __init__(self, model, timestep_map: np.ndarray, original_num_steps):
        self.model = model
        self.timestep_map = timestep_map
        self.original_num_steps = original_num_steps

    def __call__(self, x, ts, **kwargs):
        lookup = _on_device(self.timestep_map, ts.device)  # copied to the GPU once, not on every call
        return self.model(x, lookup[ts].to(ts.dtype), **kwargs)


class SpacedDiffusion(GaussianDiffusion):
    """A GaussianDiffusion that keeps only `use_timesteps` of a base schedule.

    Betas are recomputed so that alphas_cumprod at the kept steps equal the base ones.
    `base_betas` keeps the unspaced schedule (used by the DPM-Solver sampler).
    """

    def __init__(self, use_timesteps, **kwargs):
        self.use_timesteps = set(use_timesteps)
        self.timestep_map = []
        self.original_num_steps = len(kwargs["betas"])

        base = GaussianDiffusion(**kwargs)
        prev_ac = 1.0
        new_betas = []
        for i, ac in enumerate(base.alphas_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1 - ac / prev_ac)
                prev_ac = ac
                self.timestep_map.append(i)
        self._timestep_map_array = np.array(self.timestep_map, dtype=np.int64)
        kwargs["betas"] = np.array(new_betas)
        super().__init__(**kwargs)
        self.base_betas = base.betas

    def p_mean_variance(self, model, *args, **kwargs):
        """See GaussianDiffusion.p_mean_variance; the model sees original timesteps."""
        return super().p_mean_variance(self._wrap_model(model), *args, **kwargs)

    def training_losses(self, model, *args, **kwargs):
        """See GaussianDiffusion.training_losses; the model sees original timesteps."""
        return super().training_losses(self._wrap_model(model), *args, **kwargs)

    def condition_mean(self, cond_fn, *args, **kwargs):
        """See GaussianDiffusion.condition_mean; cond_fn sees original timesteps."""
        return super().condition_mean(self._wrap_model(cond_fn), *args, **kwargs)

    def condition_score(self, cond_fn, *args, **kwargs):
        """See GaussianDiffusion.condition_score; cond_fn sees original timesteps."""
        return super().condition_score(self._wrap_model(cond_fn), *args, **kwargs)

    def _wrap_model(self, model):
        """Wrap once so compact indices are mapped to original timesteps."""
        if isinstance(model, _WrappedModel):
            return model
        return _WrappedModel(model, self._timestep_map_array, self.original_num_steps)

    def _scale_timesteps(self, t):
        """Scaling is done by the wrapper, so this is the identity."""
        return t
