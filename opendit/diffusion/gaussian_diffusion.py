"""Discrete-time Gaussian diffusion (DDPM / improved DDPM) with DDIM sampling.

All schedule buffers are float64 numpy arrays; they are gathered per timestep and
cast to float32 tensors when used, so numbers match the reference DiT/IDDPM setup.
"""

from __future__ import annotations

import enum
import math

import numpy as np
import torch as th

from .diffusion_utils import discretized_gaussian_log_likelihood, mean_flat, normal_kl

__all__ = [
    "ModelMeanType",
    "ModelVarType",
    "LossType",
    "GaussianDiffusion",
    "get_named_beta_schedule",
    "betas_for_alpha_bar",
    "mean_flat",
]


class ModelMeanType(enum.Enum):
    """What the network's first C output channels represent."""

    PREVIOUS_X = enum.auto()  # the posterior mean of x_{t-1}
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the added noise


class ModelVarType(enum.Enum):
    """How the reverse-process variance is obtained."""

    LEARNED = enum.auto()  # network outputs log-variance directly
    FIXED_SMALL = enum.auto()  # posterior variance beta-tilde
    FIXED_LARGE = enum.auto()  # beta_t
    LEARNED_RANGE = enum.auto()  # network interpolates between beta-tilde and beta in log space


class LossType(enum.Enum):
    """Training objective."""

    MSE = enum.auto()  # simple loss (plus VB term when the variance is learned)
    RESCALED_MSE = enum.auto()  # as MSE, VB term rescaled as in IDDPM
    KL = enum.auto()  # the full variational bound
    RESCALED_KL = enum.auto()  # VB multiplied by the number of timesteps

    def is_vb(self) -> bool:
        """True for the pure variational-bound losses."""
        return self in (LossType.KL, LossType.RESCALED_KL)


def betas_for_alpha_bar(num_diffusion_timesteps: int, alpha_bar, max_beta: float = 0.999) -> np.ndarray:
    """Discretise a continuous alpha-bar(t), t in [0, 1], into per-step betas capped at max_beta."""
    steps = num_diffusion_timesteps
    betas = [min(1.0 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), max_beta) for i in range(steps)]
    return np.array(betas, dtype=np.float64)


def get_beta_schedule(beta_schedule: str, *, beta_start: float, beta_end: float, num_diffusion_timesteps: int) -> np.ndarray:
    """Simple parametric schedules between beta_start and beta_end."""
    n = num_diffusion_timesteps
    if beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, n, dtype=np.float64)
    elif beta_schedule == "quad":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
    elif beta_schedule == "const":
        betas = np.full(n, beta_end, dtype=np.float64)
    else:
        raise NotImplementedError(f"unknown beta schedule: {beta_schedule}")
    assert betas.shape == (n,)
    return betas


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """Named schedules: "linear" (DDPM, scaled to the step count) and "squaredcos_cap_v2" (cosine)."""
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return get_beta_schedule(
            "linear",
            beta_start=scale * 0.0001,
            beta_end=scale * 0.02,
            num_diffusion_timesteps=num_diffusion_timesteps,
        )
    if schedule_name == "squaredcos_cap_v2":
        return betas_for_alpha_bar(
            num_diffusion_timesteps,
            lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2,
        )
    raise NotImplementedError(f"unknown beta schedule: {schedule_name}")


_ON_DEVICE = {}  # (id(arr), device) -> (arr, tensor): schedules copied to a device once, not on every call


def _on_device(arr: np.ndarray, device: th.device) -> th.Tensor:
    """arr as a tensor on device, cached: a host-to-device copy per call would stall the GPU queue every step
    (arr must be an array kept alive, e.g. an attribute set once: a fresh array each call misses the cache)."""
    key = (id(arr), str(device))
    hit = _ON_DEVICE.get(key)
    if hit is None or hit[0] is not arr:
        hit = _ON_DEVICE[key] = (arr, th.from_numpy(arr).to(device))
    return hit[1]


def _extract_into_tensor(arr: np.ndarray, timesteps: th.Tensor, broadcast_shape) -> th.Tensor:
    """Gather arr[timesteps] as float32 and broadcast it to broadcast_shape (batch first)."""
    values = _on_device(arr, timesteps.device)[timesteps].float()
    values = values.reshape(values.shape + (1,) * (len(broadcast_shape) - values.ndim))
    return values.expand(broadcast_shape)


class GaussianDiffusion:
    """Forward noising, reverse sampling and training losses for a fixed beta schedule."""

    def __init__(self, *, betas, model_mean_type: ModelMeanType, model_var_type: ModelVarType, loss_type: LossType, snr_gamma: float = 0.0):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.snr_gamma = snr_gamma  # > 0: Min-SNR-gamma weighting of the eps MSE (Hang et al., 2023); 0: DiT's plain MSE

        betas = np.array(betas, dtype=np.float64)
        assert betas.ndim == 1, "betas must be 1-D"
        assert (betas > 0).all() and (betas <= 1).all(), "betas must lie in (0, 1]"
        self.betas = betas
        self.log_betas = np.log(betas)
        # Schedule the DPM-Solver uses; SpacedDiffusion replaces it with the unspaced one.
        self.base_betas = betas
        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        ac = np.cumprod(alphas, axis=0)
        self.alphas_cumprod = ac
        self.one_minus_alphas_cumprod = 1.0 - ac
        self.alphas_cumprod_prev = np.append(1.0, ac[:-1])
        self.alphas_cumprod_next = np.append(ac[1:], 0.0)
        assert self.alphas_cumprod_prev.shape == (self.num_timesteps,)
        snr = ac / (1.0 - ac)  # signal-to-noise ratio of x_t
        self.min_snr_weights = np.minimum(snr, snr_gamma) / snr if snr_gamma > 0 else np.ones_like(snr)

        # q(x_t | x_0)
        self.sqrt_alphas_cumprod = np.sqrt(ac)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - ac)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - ac)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / ac)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / ac - 1)

        # q(x_{t-1} | x_t, x_0)
        ac_prev = self.alphas_cumprod_prev
        self.posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
        # The variance is 0 at t = 0, so its log is clipped by reusing the t = 1 value.
        if len(self.posterior_variance) > 1:
            self.posterior_log_variance_clipped = np.log(
                np.append(self.posterior_variance[1], self.posterior_variance[1:])
            )
        else:
            self.posterior_log_variance_clipped = np.array([], dtype=np.float64)
        self.posterior_mean_coef1 = betas * np.sqrt(ac_prev) / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)
        # Fixed-large variance: beta_t, except at t = 0 where beta-tilde_1 gives a better decoder.
        self.fixed_large_variance = np.append(self.posterior_variance[1], betas[1:]) if len(betas) > 1 else betas
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)

    # ------------------------------------------------------------------ forward process
    def q_mean_variance(self, x_start, t):
        """Mean, variance and log-variance of q(x_t | x_0)."""
        mean = _extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        variance = _extract_into_tensor(self.one_minus_alphas_cumprod, t, x_start.shape)
        log_variance = _extract_into_tensor(self.log_one_minus_alphas_cumprod, t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None):
        """Draw x_t ~ q(x_t | x_0) (optionally with given noise)."""
        if noise is None:
            noise = th.randn_like(x_start)
        assert noise.shape == x_start.shape
        return (
            _extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + _extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        assert x_start.shape == x_t.shape
        mean = (
            _extract_into_tensor(self.posterior_mean_coef1, t, x_t.shape) * x_start
            + _extract_into_tensor(self.posterior_mean_coef2, t, x_t.shape) * x_t
        )
        variance = _extract_into_tensor(self.posterior_variance, t, x_t.shape)
        log_variance = _extract_into_tensor(self.posterior_log_variance_clipped, t, x_t.shape)
        return mean, variance, log_variance

    # ------------------------------------------------------------------ reverse process
    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """Run the model and turn its output into p(x_{t-1} | x_t) plus a prediction of x_0."""
        model_kwargs = {} if model_kwargs is None else model_kwargs
        B, C = x.shape[:2]
        assert t.shape == (B,)
        model_output = model(x, t, **model_kwargs)
        extra = None
        if isinstance(model_output, tuple):
            model_output, extra = model_output

        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            assert model_output.shape == (B, C * 2, *x.shape[2:])
            model_output, var_values = th.split(model_output, C, dim=1)
            if self.model_var_type == ModelVarType.LEARNED:
                model_log_variance = var_values
            else:
                lower = _extract_into_tensor(self.posterior_log_variance_clipped, t, x.shape)
                upper = _extract_into_tensor(self.log_betas, t, x.shape)
                frac = (var_values + 1) / 2  # network output lives in [-1, 1]
                model_log_variance = frac * upper + (1 - frac) * lower
            model_variance = th.exp(model_log_variance)
        else:
            if self.model_var_type == ModelVarType.FIXED_LARGE:
                var_arr, log_var_arr = self.fixed_large_variance, self.fixed_large_log_variance
            else:
                var_arr, log_var_arr = self.posterior_variance, self.posterior_log_variance_clipped
            model_variance = _extract_into_tensor(var_arr, t, x.shape)
            model_log_variance = _extract_into_tensor(log_var_arr, t, x.shape)

        def process_xstart(x0):
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            return x0.clamp(-1, 1) if clip_denoised else x0

        if self.model_mean_type == ModelMeanType.START_X:
            pred_xstart = process_xstart(model_output)
        elif self.model_mean_type == ModelMeanType.EPSILON:
            pred_xstart = process_xstart(self._predict_xstart_from_eps(x_t=x, t=t, eps=model_output))
        else:
            raise NotImplementedError(self.model_mean_type)
        model_mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)

        assert model_mean.shape == model_log_variance.shape == pred_xstart.shape == x.shape
        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
            "extra": extra,
        }

    def _predict_xstart_from_eps(self, x_t, t, eps):
        """Invert q_sample: x_0 from x_t and the noise."""
        assert x_t.shape == eps.shape
        return (
            _extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        """Invert q_sample: the noise from x_t and x_0."""
        return (
            _extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart
        ) / _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape)

    def _scale_timesteps(self, t):
        """Timesteps are passed to the model unscaled."""
        return t

    # ------------------------------------------------------------------ guidance
    def condition_mean(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Shift the reverse mean by variance * grad log p(y|x_t) (Dhariwal & Nichol, 2021)."""
        model_kwargs = {} if model_kwargs is None else model_kwargs
        gradient = cond_fn(x, t, **model_kwargs)
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    def condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Guide via the score: eps <- eps - sqrt(1 - alpha_bar) * grad log p(y|x_t) (for DDIM)."""
        model_kwargs = {} if model_kwargs is None else model_kwargs
        alpha_bar = _extract_into_tensor(self.alphas_cumprod, t, x.shape)
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - (1 - alpha_bar).sqrt() * cond_fn(x, t, **model_kwargs)
        out = dict(p_mean_var)
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(x_start=out["pred_xstart"], x_t=x, t=t)
        return out

    # ------------------------------------------------------------------ ancestral sampling
    @staticmethod
    def _nonzero_mask(t, x):
        """1 for samples whose t > 0 (noise is added), 0 at the last step; shaped to broadcast over x."""
        return (t != 0).float().view(-1, *([1] * (x.ndim - 1)))

    def p_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None):
        """One ancestral step: sample x_{t-1} from the model at timestep t."""
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        noise = th.randn_like(x)
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
        sample = out["mean"] + self._nonzero_mask(t, x) * th.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    @staticmethod
    def _loop_setup(shape, noise, device):
        """Resolve the device and the initial x_T for a sampling loop."""
        assert isinstance(shape, (tuple, list))
        if device is None:
            device = noise.device if noise is not None else th.device("cpu")
        img = noise if noise is not None else th.randn(*shape, device=device)
        return img, device

    def _timestep_indices(self, progress):
        """Reverse-ordered timestep indices, optionally wrapped in a tqdm bar."""
        indices = list(range(self.num_timesteps))[::-1]
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices)
        return indices

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
                      model_kwargs=None, device=None, progress=False):
        """Ancestral sampling from x_T to x_0; returns the final sample."""
        final = None
        for final in self.p_sample_loop_progressive(
            model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            cond_fn=cond_fn, model_kwargs=model_kwargs, device=device, progress=progress,
        ):
            pass
        return final["sample"]

    def p_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                  cond_fn=None, model_kwargs=None, device=None, progress=False):
        """Generator over the per-step outputs of p_sample, from t = T-1 down to 0."""
        img, device = self._loop_setup(shape, noise, device)
        for i in self._timestep_indices(progress):
            t = th.tensor([i] * shape[0], device=device)
            with th.no_grad():
                out = self.p_sample(
                    model, img, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                    cond_fn=cond_fn, model_kwargs=model_kwargs,
                )
                yield out
                img = out["sample"]

    # ------------------------------------------------------------------ DDIM
    def ddim_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None,
                    model_kwargs=None, eta=0.0):
        """One DDIM step from x_t to x_{t-1}; eta = 0 is deterministic, eta = 1 is DDPM-like."""
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        abar = _extract_into_tensor(self.alphas_cumprod, t, x.shape)
        abar_prev = _extract_into_tensor(self.alphas_cumprod_prev, t, x.shape)
        sigma = eta * th.sqrt((1 - abar_prev) / (1 - abar)) * th.sqrt(1 - abar / abar_prev)
        noise = th.randn_like(x)
        mean_pred = out["pred_xstart"] * th.sqrt(abar_prev) + th.sqrt(1 - abar_prev - sigma**2) * eps
        sample = mean_pred + self._nonzero_mask(t, x) * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None,
                            model_kwargs=None, eta=0.0):
        """Deterministic DDIM step forward in time, from x_t to x_{t+1} (inversion)."""
        assert eta == 0.0, "reverse ODE only for deterministic path"
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        eps = (
            _extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x.shape) * x - out["pred_xstart"]
        ) / _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x.shape)
        abar_next = _extract_into_tensor(self.alphas_cumprod_next, t, x.shape)
        mean_pred = out["pred_xstart"] * th.sqrt(abar_next) + th.sqrt(1 - abar_next) * eps
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
                         model_kwargs=None, device=None, progress=False, eta=0.0):
        """DDIM sampling from x_T to x_0; returns the final sample."""
        final = None
        for final in self.ddim_sample_loop_progressive(
            model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            cond_fn=cond_fn, model_kwargs=model_kwargs, device=device, progress=progress, eta=eta,
        ):
            pass
        return final["sample"]

    def ddim_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                     cond_fn=None, model_kwargs=None, device=None, progress=False, eta=0.0):
        """Generator over the per-step outputs of ddim_sample, from t = T-1 down to 0."""
        img, device = self._loop_setup(shape, noise, device)
        for i in self._timestep_indices(progress):
            t = th.tensor([i] * shape[0], device=device)
            with th.no_grad():
                out = self.ddim_sample(
                    model, img, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                    cond_fn=cond_fn, model_kwargs=model_kwargs, eta=eta,
                )
                yield out
                img = out["sample"]

    # ------------------------------------------------------------------ DPM-Solver
    def dpm_solver_sample_loop(self, model, shape, num_steps=25, noise=None, model_kwargs=None,
                               device=None, progress=False):
        """DPM-Solver++(2M) sampling on `self.base_betas` (the unspaced schedule for SpacedDiffusion).

        The model receives timesteps in the original (unspaced) index space.
        """
        from .dpm_solver import dpm_solver_sample_loop

        return dpm_solver_sample_loop(
            model, shape, num_steps=num_steps, noise=noise, model_kwargs=model_kwargs,
            device=device, progress=progress, betas=self.base_betas,
        )

    # ------------------------------------------------------------------ losses
    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        """Per-sample variational-bound term in bits per dimension (decoder NLL at t = 0, KL otherwise)."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / math.log(2.0)

        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        assert decoder_nll.shape == x_start.shape
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)

        output = th.where(t == 0, decoder_nll, kl)
        return {"output": output, "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Per-sample training losses at timesteps t; returns a dict with "loss" (and "mse", "vb")."""
        model_kwargs = {} if model_kwargs is None else model_kwargs
        if noise is None:
            noise = th.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        if self.loss_type.is_vb():
            loss = self._vb_terms_bpd(model=model, x_start=x_start, x_t=x_t, t=t, clip_denoised=False, model_kwargs=model_kwargs)["output"]
            terms = {"loss": loss * self.num_timesteps if self.loss_type == LossType.RESCALED_KL else loss}
        elif self.loss_type in (LossType.MSE, LossType.RESCALED_MSE):
            terms = self._mse_losses(model(x_t, t, **model_kwargs), x_start, x_t, t, noise)
        else:
            raise NotImplementedError(self.loss_type)
        return terms

    def _mse_losses(self, model_output, x_start, x_t, t, noise):
        """The MSE loss terms ("mse", with the learned-sigma "vb" and their sum "loss") from the model's output."""
        terms = {}
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            B, C = x_t.shape[:2]
            assert model_output.shape == (B, C * 2, *x_t.shape[2:])
            model_output, var_values = th.split(model_output, C, dim=1)
            # The VB term trains only the variance: the mean half is detached.
            frozen_out = th.cat([model_output.detach(), var_values], dim=1)

            def frozen_model(*_args, **_kwargs):
                return frozen_out

            terms["vb"] = self._vb_terms_bpd(
                model=frozen_model, x_start=x_start, x_t=x_t, t=t, clip_denoised=False
            )["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                # The MSE term is an average, not a sum over steps: rescale like the reference.
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            target = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)[0]
        elif self.model_mean_type == ModelMeanType.START_X:
            target = x_start
        elif self.model_mean_type == ModelMeanType.EPSILON:
            target = noise
        else:
            raise NotImplementedError(self.model_mean_type)
        assert model_output.shape == target.shape == x_start.shape
        terms["mse"] = mean_flat((target - model_output) ** 2)
        if self.snr_gamma > 0 and self.model_mean_type == ModelMeanType.EPSILON:
            terms["mse"] = terms["mse"] * _extract_into_tensor(self.min_snr_weights, t, t.shape)  # min(SNR, gamma) / SNR
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def compile_losses(self, **compile_kwargs) -> "GaussianDiffusion":
        """torch.compile the loss terms computed from the model's output (the VB term is dozens of small elementwise
        kernels forward and backward; compiled, a few): train.py's --compile."""
        self._mse_losses = th.compile(self._mse_losses, **compile_kwargs)
        return self

    # ------------------------------------------------------------------ likelihood evaluation
    def _prior_bpd(self, x_start):
        """KL(q(x_T | x_0) || N(0, I)) in bits per dimension, per sample."""
        batch_size = x_start.shape[0]
        t = th.tensor([self.num_timesteps - 1] * batch_size, device=x_start.device)
        qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
        kl_prior = normal_kl(mean1=qt_mean, logvar1=qt_log_variance, mean2=0.0, logvar2=0.0)
        return mean_flat(kl_prior) / math.log(2.0)

    def calc_bpd_loop(self, model, x_start, clip_denoised=True, model_kwargs=None):
        """Full variational bound in bits/dim, plus per-timestep vb, x_0 MSE and eps MSE."""
        device = x_start.device
        batch_size = x_start.shape[0]
        vb, xstart_mse, eps_mse = [], [], []
        for step in list(range(self.num_timesteps))[::-1]:
            t = th.tensor([step] * batch_size, device=device)
            noise = th.randn_like(x_start)
            x_t = self.q_sample(x_start=x_start, t=t, noise=noise)
            with th.no_grad():
                out = self._vb_terms_bpd(
                    model, x_start=x_start, x_t=x_t, t=t, clip_denoised=clip_denoised, model_kwargs=model_kwargs
                )
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t, out["pred_xstart"])
            eps_mse.append(mean_flat((eps - noise) ** 2))

        vb = th.stack(vb, dim=1)
        xstart_mse = th.stack(xstart_mse, dim=1)
        eps_mse = th.stack(eps_mse, dim=1)
        prior_bpd = self._prior_bpd(x_start)
        total_bpd = vb.sum(dim=1) + prior_bpd
        return {
            "total_bpd": total_bpd,
            "prior_bpd": prior_bpd,
            "vb": vb,
            "xstart_mse": xstart_mse,
            "mse": eps_mse,
        }
