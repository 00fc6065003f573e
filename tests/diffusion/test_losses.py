"""training_losses, the VB terms and likelihood evaluation."""

import math

import pytest
import torch as th

from opendit.diffusion import create_diffusion


def test_training_losses_shapes_and_sum(base_diffusion, conv_model):
    th.manual_seed(0)
    x0 = th.rand(3, 4, 8, 8) * 2 - 1
    t = th.tensor([0, 10, 999])
    terms = base_diffusion.training_losses(conv_model, x0, t)
    for key in ("loss", "mse", "vb"):
        assert terms[key].shape == (3,) and th.isfinite(terms[key]).all()
    th.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])


def test_vb_gradient_reaches_only_variance_half(base_diffusion):
    x0 = th.rand(2, 4, 4, 4) * 2 - 1
    t = th.tensor([5, 400])
    out = th.zeros(2, 8, 4, 4, requires_grad=True)
    terms = base_diffusion.training_losses(lambda x, t: out * 1.0 + 0.1, x0, t, noise=th.randn_like(x0))
    (g_vb,) = th.autograd.grad(terms["vb"].sum(), out, retain_graph=True)
    assert g_vb[:, :4].abs().max() == 0 and g_vb[:, 4:].abs().max() > 0
    (g_mse,) = th.autograd.grad(terms["mse"].sum(), out)
    assert g_mse[:, 4:].abs().max() == 0 and g_mse[:, :4].abs().max() > 0


def test_oracle_noise_model_has_zero_mse(base_diffusion):
    x0 = th.rand(4, 4, 8, 8) * 2 - 1
    noise = th.randn_like(x0)
    t = th.tensor([0, 1, 500, 999])
    oracle = lambda x, t: th.cat([noise, th.zeros_like(noise)], dim=1)
    terms = base_diffusion.training_losses(oracle, x0, t, noise=noise)
    assert terms["mse"].abs().max() == 0


def test_mse_value_and_model_kwargs(base_diffusion):
    x0 = th.zeros(2, 4, 2, 2)
    noise = th.ones_like(x0)
    model = lambda x, t, y: th.cat([th.full_like(x, y), th.zeros_like(x)], dim=1)
    terms = base_diffusion.training_losses(model, x0, th.tensor([3, 3]), model_kwargs={"y": 0.5}, noise=noise)
    th.testing.assert_close(terms["mse"], th.full((2,), 0.25))


def test_rescaled_and_kl_losses(conv_model):
    x0 = th.rand(2, 4, 4, 4) * 2 - 1
    t, noise = th.tensor([0, 30]), th.randn(2, 4, 4, 4)
    plain = create_diffusion("", rescale_learned_sigmas=False).training_losses(conv_model, x0, t, noise=noise)
    rescaled = create_diffusion("", rescale_learned_sigmas=True).training_losses(conv_model, x0, t, noise=noise)
    th.testing.assert_close(rescaled["vb"], plain["vb"])  # 1000 steps -> factor 1
    kl = create_diffusion("", use_kl=True).training_losses(conv_model, x0, t, noise=noise)
    assert set(kl) == {"loss"}
    th.testing.assert_close(kl["loss"], plain["vb"] * 1000)


def test_fixed_variance_and_xstart_targets():
    x0 = th.rand(2, 4, 4, 4) * 2 - 1
    t = th.tensor([3, 600])
    d = create_diffusion("", learn_sigma=False, predict_xstart=True)
    terms = d.training_losses(lambda x, t: x0.clone(), x0, t)
    assert set(terms) == {"loss", "mse"} and terms["mse"].abs().max() == 0


def test_vb_terms_closed_form(base_diffusion):
    """With the exact posterior mean, KL reduces to the variance mismatch only."""
    d = base_diffusion
    x0 = th.rand(2, 4, 4, 4) * 2 - 1
    t = th.tensor([200, 200])
    noise = th.randn_like(x0)
    xt = d.q_sample(x0, t, noise)
    oracle = lambda x, t: th.cat([noise, th.full_like(noise, 1.0)], dim=1)  # log var = log beta_t
    out = d._vb_terms_bpd(oracle, x0, xt, t, clip_denoised=False)["output"]
    lv_true, lv_model = d.posterior_log_variance_clipped[200], math.log(d.betas[200])
    expect = 0.5 * (-1 + lv_model - lv_true + math.exp(lv_true - lv_model)) / math.log(2)
    th.testing.assert_close(out, th.full((2,), expect), rtol=2e-3, atol=1e-6)


def test_p_mean_variance_learned_range_bounds(base_diffusion):
    x = th.randn(2, 4, 4, 4)
    t = th.tensor([10, 10])
    lo = base_diffusion.p_mean_variance(lambda x, t: th.cat([x, -th.ones_like(x)], 1), x, t)
    hi = base_diffusion.p_mean_variance(lambda x, t: th.cat([x, th.ones_like(x)], 1), x, t)
    assert lo["log_variance"][0, 0, 0, 0].item() == pytest.approx(base_diffusion.posterior_log_variance_clipped[10], rel=1e-5)
    assert hi["log_variance"][0, 0, 0, 0].item() == pytest.approx(math.log(base_diffusion.betas[10]), rel=1e-5)
    assert lo["pred_xstart"].abs().max() <= 1 and lo["extra"] is None
    extra = base_diffusion.p_mean_variance(lambda x, t: (th.cat([x, x], 1), "aux"), x, t)["extra"]
    assert extra == "aux"


def test_calc_bpd_loop_and_prior():
    d = create_diffusion("10")
    x0 = th.rand(2, 4, 4, 4) * 2 - 1
    model = lambda x, t: th.cat([th.zeros_like(x), th.zeros_like(x)], 1)
    out = d.calc_bpd_loop(model, x0)
    assert out["vb"].shape == (2, 10) and out["mse"].shape == (2, 10) and out["xstart_mse"].shape == (2, 10)
    th.testing.assert_close(out["total_bpd"], out["vb"].sum(1) + out["prior_bpd"])
    # The prior is tiny for the linear schedule (alpha_bar_T ~ 4e-5).
    assert (out["prior_bpd"] >= 0).all() and (out["prior_bpd"] < 1e-3).all()


@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
def test_min_snr_weighting(base_diffusion, conv_model, schedule):
    """--snr_gamma: the eps MSE of sample i is scaled by min(SNR(t_i), gamma) / SNR(t_i); the VB term is unchanged;
    gamma 0 (DiT's default) changes nothing."""
    plain, weighted = create_diffusion("", noise_schedule=schedule), create_diffusion("", noise_schedule=schedule, snr_gamma=5.0)
    x0 = th.rand(4, 4, 8, 8) * 2 - 1
    noise = th.randn_like(x0)
    t = th.tensor([0, 100, 500, 999])
    a, b = (d.training_losses(conv_model, x0, t, noise=noise) for d in (plain, weighted))
    ac = th.tensor(plain.alphas_cumprod)[t]
    snr = ac / (1 - ac)
    th.testing.assert_close(b["mse"], a["mse"] * (snr.clamp(max=5.0) / snr).float())
    th.testing.assert_close(b["vb"], a["vb"])
    assert b["mse"][0] < a["mse"][0] and b["mse"][-1] == a["mse"][-1]  # low t (high SNR) weighted down, high t kept
    c = base_diffusion.training_losses(conv_model, x0, t, noise=noise) if schedule == "linear" else a
    assert th.equal(c["mse"], a["mse"])


def _losses_and_grad(diffusion, device: str):
    """The loss terms at timesteps that include t = 0 (the decoder NLL branch), and their gradient on the model output."""
    gen = th.Generator().manual_seed(0)
    x = th.randn(6, 4, 8, 8, generator=gen).to(device)
    noise = th.randn(6, 4, 8, 8, generator=gen).to(device)
    out = th.randn(6, 8, 8, 8, generator=gen).to(device).requires_grad_(True)
    t = th.tensor([0, 1, 10, 500, 998, 999], device=device)
    terms = diffusion.training_losses(lambda *a, **k: out, x, t, {}, noise=noise)
    (grad,) = th.autograd.grad(terms["loss"].sum(), out)
    return {k: v.detach() for k, v in terms.items()}, grad


@pytest.mark.parametrize("snr_gamma", [0.0, 5.0])
def test_compiled_losses_equal_eager_ones(snr_gamma):
    """compile_losses() (train.py's --compile) traces the whole loss tail as one graph: same terms and gradient."""
    eager = _losses_and_grad(create_diffusion("", snr_gamma=snr_gamma), "cpu")
    compiled = _losses_and_grad(create_diffusion("", snr_gamma=snr_gamma).compile_losses(backend="aot_eager", fullgraph=True), "cpu")
    assert compiled[0].keys() == eager[0].keys() == {"loss", "mse", "vb"}
    for k in eager[0]:
        th.testing.assert_close(compiled[0][k], eager[0][k], rtol=1e-6, atol=1e-6)
    th.testing.assert_close(compiled[1], eager[1], rtol=1e-6, atol=1e-7)


@pytest.mark.gpu
def test_inductor_compiled_losses_on_cuda():
    eager = _losses_and_grad(create_diffusion(""), "cuda")
    compiled = _losses_and_grad(create_diffusion("").compile_losses(fullgraph=True), "cuda")
    for k in eager[0]:  # inductor's fused tanh / exp / log and reordered means: fp32 rounding, not a different loss
        th.testing.assert_close(compiled[0][k], eager[0][k], rtol=1e-5, atol=1e-5)
    th.testing.assert_close(compiled[1], eager[1], rtol=1e-4, atol=1e-4 * eager[1].abs().max().item())
