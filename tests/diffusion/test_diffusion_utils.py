"""Closed-form checks for the probability helpers."""

import math

import pytest
import torch as th

from opendit.diffusion.diffusion_utils import (
    approx_standard_normal_cdf,
    continuous_gaussian_log_likelihood,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
)


def _kl(m1, lv1, m2, lv2):
    v1, v2 = math.exp(lv1), math.exp(lv2)
    return math.log(math.sqrt(v2) / math.sqrt(v1)) + (v1 + (m1 - m2) ** 2) / (2 * v2) - 0.5


def _cdf(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


@pytest.mark.parametrize("args", [(0.0, 0.0, 0.0, 0.0), (1.0, -1.0, 0.5, 0.3), (-2.0, 0.7, 1.0, -2.0)])
def test_normal_kl(args):
    m1, lv1, m2, lv2 = args
    out = normal_kl(th.tensor(m1, dtype=th.float64), lv1, m2, lv2)
    assert out.item() == pytest.approx(_kl(*args), rel=1e-10, abs=1e-12)


def test_normal_kl_broadcast_and_scalars():
    out = normal_kl(th.zeros(2, 3), th.zeros(2, 3), 0.0, 0.0)
    assert out.shape == (2, 3) and out.abs().max() == 0
    with pytest.raises(AssertionError):
        normal_kl(0.0, 0.0, 0.0, 0.0)


def test_approx_cdf_close_to_erf():
    xs = th.linspace(-5, 5, 101, dtype=th.float64)
    approx = approx_standard_normal_cdf(xs)
    exact = th.tensor([_cdf(v) for v in xs.tolist()], dtype=th.float64)
    assert (approx - exact).abs().max() < 5e-4
    assert approx_standard_normal_cdf(th.tensor(0.0)).item() == 0.5


def test_discretized_log_likelihood_values():
    x = th.tensor([-1.0, -0.2, 0.0, 0.5, 1.0], dtype=th.float64)
    means = th.tensor([0.0, -0.1, 0.0, 0.4, 0.9], dtype=th.float64)
    log_scales = th.tensor([0.0, -1.0, -2.0, -0.5, -3.0], dtype=th.float64)
    out = discretized_gaussian_log_likelihood(x, means=means, log_scales=log_scales)

    def approx_cdf(v):
        return 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3)))

    for i in range(5):
        xi, mi, s = x[i].item(), means[i].item(), math.exp(log_scales[i].item())
        upper = approx_cdf((xi - mi + 1 / 255) / s)
        lower = approx_cdf((xi - mi - 1 / 255) / s)
        if xi < -0.999:
            expect = math.log(max(upper, 1e-12))
        elif xi > 0.999:
            expect = math.log(max(1 - lower, 1e-12))
        else:
            expect = math.log(max(upper - lower, 1e-12))
        assert out[i].item() == pytest.approx(expect, rel=1e-9)
        # The approximation is close to the exact Gaussian bin mass.
        exact_upper, exact_lower = _cdf((xi - mi + 1 / 255) / s), _cdf((xi - mi - 1 / 255) / s)
        exact = exact_upper if xi < -0.999 else (1 - exact_lower if xi > 0.999 else exact_upper - exact_lower)
        assert out[i].item() == pytest.approx(math.log(exact), abs=0.02)


def test_discretized_log_likelihood_clamped():
    out = discretized_gaussian_log_likelihood(th.tensor([0.0]), means=th.tensor([10.0]), log_scales=th.tensor([-5.0]))
    assert out.item() == pytest.approx(math.log(1e-12))


def test_continuous_log_likelihood_and_mean_flat():
    x, m, ls = th.tensor([0.3]), th.tensor([0.1]), th.tensor([math.log(2.0)])
    expect = -0.5 * (0.2 / 2.0) ** 2 - math.log(2.0) - 0.5 * math.log(2 * math.pi)
    assert continuous_gaussian_log_likelihood(x, means=m, log_scales=ls).item() == pytest.approx(expect, rel=1e-6)
    t = th.arange(24.0).reshape(2, 3, 4)
    th.testing.assert_close(mean_flat(t), th.tensor([5.5, 17.5]))
