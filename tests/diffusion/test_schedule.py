"""Beta schedules and derived float64 buffers against closed forms and diffusers."""

import math

import numpy as np
import pytest
import torch as th

from opendit.diffusion import GaussianDiffusion, create_diffusion, get_named_beta_schedule
from opendit.diffusion.gaussian_diffusion import LossType, ModelMeanType, ModelVarType, _extract_into_tensor


def test_linear_betas_closed_form():
    betas = get_named_beta_schedule("linear", 1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    expected = 1e-4 + (0.02 - 1e-4) * np.arange(1000) / 999
    np.testing.assert_allclose(betas, expected, rtol=0, atol=1e-15)
    # Fewer steps scale the endpoints by 1000 / steps.
    np.testing.assert_allclose(get_named_beta_schedule("linear", 250)[[0, -1]], [4e-4, 0.08], atol=1e-15)


def test_squaredcos_betas():
    steps = 100
    betas = get_named_beta_schedule("squaredcos_cap_v2", steps)
    abar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    for i in (0, 1, 50, 98, 99):
        assert betas[i] == pytest.approx(min(1 - abar((i + 1) / steps) / abar(i / steps), 0.999), abs=1e-15)
    assert betas.max() <= 0.999


def test_unknown_schedule_raises():
    with pytest.raises(NotImplementedError):
        get_named_beta_schedule("nope", 10)


def test_derived_buffers(base_diffusion):
    d = base_diffusion
    betas = get_named_beta_schedule("linear", 1000)
    ac = np.cumprod(1 - betas)
    assert d.num_timesteps == 1000
    np.testing.assert_allclose(d.betas, betas, rtol=1e-12)
    np.testing.assert_allclose(d.alphas_cumprod, ac, rtol=1e-12)
    assert d.alphas_cumprod_prev[0] == 1.0 and d.alphas_cumprod_next[-1] == 0.0
    np.testing.assert_allclose(d.alphas_cumprod_prev[1:], ac[:-1])
    np.testing.assert_allclose(d.sqrt_recipm1_alphas_cumprod, np.sqrt(1 / ac - 1), rtol=1e-12)
    post_var = betas * (1 - d.alphas_cumprod_prev) / (1 - ac)
    np.testing.assert_allclose(d.posterior_variance, post_var, rtol=1e-12)
    assert d.posterior_variance[0] == 0.0
    assert d.posterior_log_variance_clipped[0] == pytest.approx(math.log(post_var[1]))
    np.testing.assert_allclose(d.posterior_log_variance_clipped[1:], np.log(post_var[1:]), rtol=1e-12)
    np.testing.assert_allclose(d.posterior_mean_coef1, betas * np.sqrt(d.alphas_cumprod_prev) / (1 - ac), rtol=1e-12)
    np.testing.assert_allclose(
        d.posterior_mean_coef2, (1 - d.alphas_cumprod_prev) * np.sqrt(1 - betas) / (1 - ac), rtol=1e-12
    )


def test_create_diffusion_options():
    d = create_diffusion(None)
    assert d.model_var_type == ModelVarType.LEARNED_RANGE
    assert d.model_mean_type == ModelMeanType.EPSILON and d.loss_type == LossType.MSE
    assert d.num_timesteps == 1000
    assert create_diffusion("", use_kl=True).loss_type == LossType.RESCALED_KL
    assert create_diffusion("", rescale_learned_sigmas=True).loss_type == LossType.RESCALED_MSE
    assert create_diffusion("", learn_sigma=False).model_var_type == ModelVarType.FIXED_LARGE
    assert create_diffusion("", learn_sigma=False, sigma_small=True).model_var_type == ModelVarType.FIXED_SMALL
    assert create_diffusion("", predict_xstart=True).model_mean_type == ModelMeanType.START_X
    assert create_diffusion("100", diffusion_steps=500).num_timesteps == 100


def test_bad_betas_rejected():
    kw = dict(model_mean_type=ModelMeanType.EPSILON, model_var_type=ModelVarType.FIXED_SMALL, loss_type=LossType.MSE)
    with pytest.raises(AssertionError):
        GaussianDiffusion(betas=np.array([0.0, 0.1]), **kw)
    with pytest.raises(AssertionError):
        GaussianDiffusion(betas=np.ones((2, 2)) * 0.1, **kw)


def test_extract_into_tensor():
    arr = np.arange(10, dtype=np.float64) / 10
    out = _extract_into_tensor(arr, th.tensor([3, 7]), (2, 4, 5, 5))
    assert out.dtype == th.float32 and out.shape == (2, 4, 5, 5)
    assert out[0].unique().item() == pytest.approx(0.3) and out[1].unique().item() == pytest.approx(0.7)


def test_matches_diffusers_ddpm_scheduler(base_diffusion):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    np.testing.assert_allclose(sched.alphas_cumprod.numpy(), base_diffusion.alphas_cumprod, rtol=0, atol=1e-6)


def test_q_sample_statistics(base_diffusion):
    d = base_diffusion
    gen = th.Generator().manual_seed(0)
    n = 200_000
    for step in (0, 100, 500, 999):
        x0 = th.full((n, 1), 0.7)
        t = th.full((n,), step, dtype=th.long)
        xt = d.q_sample(x0, t, noise=th.randn(x0.shape, generator=gen))
        mean, var, log_var = d.q_mean_variance(x0, t)
        ac = d.alphas_cumprod[step]
        assert xt.mean().item() == pytest.approx(math.sqrt(ac) * 0.7, abs=0.01)
        assert xt.var().item() == pytest.approx(1 - ac, rel=0.02, abs=1e-4)
        assert mean[0, 0].item() == pytest.approx(math.sqrt(ac) * 0.7, rel=1e-6)
        assert var[0, 0].item() == pytest.approx(1 - ac, rel=1e-6)
        assert log_var[0, 0].item() == pytest.approx(math.log(1 - ac), rel=1e-5)


def test_q_posterior(base_diffusion):
    d = base_diffusion
    x0, xt = th.randn(3, 2, 4, 4), th.randn(3, 2, 4, 4)
    t = th.tensor([0, 10, 999])
    mean, var, log_var = d.q_posterior_mean_variance(x0, xt, t)
    for b, step in enumerate(t.tolist()):
        expect = d.posterior_mean_coef1[step] * x0[b] + d.posterior_mean_coef2[step] * xt[b]
        th.testing.assert_close(mean[b], expect.float(), rtol=1e-5, atol=1e-6)
        assert var[b].unique().item() == pytest.approx(d.posterior_variance[step], rel=1e-6)
        assert log_var[b].unique().item() == pytest.approx(d.posterior_log_variance_clipped[step], rel=1e-6)
    # At t = 0 the posterior mean is x_0 itself.
    th.testing.assert_close(mean[0], x0[0])
