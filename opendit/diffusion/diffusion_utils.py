"""Probability helpers used by the variational bound of Gaussian diffusion."""

import math

import torch as th


def mean_flat(tensor: th.Tensor) -> th.Tensor:
    """Average every dimension except the leading batch dimension."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))


def _as_tensor_like(value, ref: th.Tensor) -> th.Tensor:
    """Turn a scalar (or tensor) into a tensor on the device/dtype of `ref`."""
    if isinstance(value, th.Tensor):
        return value
    return th.tensor(value, dtype=ref.dtype, device=ref.device)


def normal_kl(mean1, logvar1, mean2, logvar2) -> th.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise with broadcasting."""
    ref = next((v for v in (mean1, logvar1, mean2, logvar2) if isinstance(v, th.Tensor)), None)
    assert ref is not None, "normal_kl needs at least one tensor argument"
    mean1, logvar1, mean2, logvar2 = (_as_tensor_like(v, ref) for v in (mean1, logvar1, mean2, logvar2))
    var_ratio = th.exp(logvar1 - logvar2)
    mahalanobis = (mean1 - mean2) ** 2 * th.exp(-logvar2)
    return 0.5 * (-1.0 + logvar2 - logvar1 + var_ratio + mahalanobis)


def approx_standard_normal_cdf(x: th.Tensor) -> th.Tensor:
    """Tanh approximation of the standard normal CDF."""
    return 0.5 * (1.0 + th.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * th.pow(x, 3))))


def continuous_gaussian_log_likelihood(x: th.Tensor, *, means: th.Tensor, log_scales: th.Tensor) -> th.Tensor:
    """Log density of x under a Gaussian with the given means and log standard deviations."""
    z = (x - means) * th.exp(-log_scales)
    return -0.5 * z**2 - log_scales - 0.5 * math.log(2.0 * math.pi)


def discretized_gaussian_log_likelihood(x: th.Tensor, *, means: th.Tensor, log_scales: th.Tensor) -> th.Tensor:
    """Log probability of 8-bit data rescaled to [-1, 1] under a binned Gaussian (nats, elementwise)."""
    assert x.shape == means.shape == log_scales.shape
    half_bin = 1.0 / 255.0
    diff = x - means
    inv_std = th.exp(-log_scales)
    cdf_upper = approx_standard_normal_cdf(inv_std * (diff + half_bin))
    cdf_lower = approx_standard_normal_cdf(inv_std * (diff - half_bin))
    log_cdf_upper = th.log(cdf_upper.clamp(min=1e-12))
    log_survival_lower = th.log((1.0 - cdf_lower).clamp(min=1e-12))
    log_bin_mass = th.log((cdf_upper - cdf_lower).clamp(min=1e-12))
    # The two outermost bins absorb the tails of the distribution.
    log_probs = th.where(
        x < -0.999,
        log_cdf_upper,
        th.where(x > 0.999, log_survival_lower, log_bin_mass),
    )
    assert log_probs.shape == x.shape
    return log_probs
