"""Ancestral, DDIM and DPM-Solver sampling."""

import numpy as np
import torch as th

from opendit.diffusion import create_diffusion, dpm_solver_sample_loop, space_timesteps


def _oracle(base, x0):
    """An eps model that knows x0: returns the exact noise of x_t (original timestep indices)."""

    def model(x, t, **kwargs):
        eps = base._predict_eps_from_xstart(x, t, x0)
        return th.cat([eps, th.zeros_like(eps)], dim=1)

    return model


def test_p_sample_loop_seeded_and_shape(conv_model):
    d = create_diffusion("20")
    runs = []
    for _ in range(2):
        th.manual_seed(123)
        runs.append(d.p_sample_loop(conv_model, (2, 4, 8, 8)))
    assert runs[0].shape == (2, 4, 8, 8)
    assert th.equal(runs[0], runs[1])
    steps = list(d.p_sample_loop_progressive(conv_model, (2, 4, 8, 8), noise=th.randn(2, 4, 8, 8)))
    assert len(steps) == 20 and set(steps[0]) == {"sample", "pred_xstart"}


def test_ddim_loop_seeded_and_timesteps():
    d = create_diffusion("ddim10")
    seen = []

    def model(x, t):
        seen.append(t[0].item())
        assert t.dtype == th.long and t.shape == (x.shape[0],)
        return th.cat([0.1 * x, th.zeros_like(x)], 1)

    outs = []
    for _ in range(2):
        th.manual_seed(7)
        outs.append(d.ddim_sample_loop(model, (3, 4, 4, 4), eta=0.5))
    assert outs[0].shape == (3, 4, 4, 4) and th.equal(outs[0], outs[1])
    assert seen[:10] == sorted(space_timesteps(1000, "ddim10"), reverse=True)
    assert seen[:10] == list(range(900, -1, -100))


def test_ddim_oracle_recovers_x0(base_diffusion):
    th.manual_seed(0)
    x0 = th.rand(2, 4, 8, 8) * 1.8 - 0.9
    for spec in ("ddim25", "50"):
        d = create_diffusion(spec)
        out = d.ddim_sample_loop(_oracle(base_diffusion, x0), (2, 4, 8, 8), eta=0.0)
        th.testing.assert_close(out, x0, atol=1e-4, rtol=0)


def test_ddim_reverse_then_forward_roundtrip(base_diffusion):
    d = create_diffusion("ddim20")
    x0 = th.rand(1, 4, 4, 4) * 1.8 - 0.9
    model = _oracle(base_diffusion, x0)
    x = x0
    for i in range(d.num_timesteps - 1):
        x = d.ddim_reverse_sample(model, x, th.tensor([i]))["sample"]
    back = d.ddim_sample_loop(model, (1, 4, 4, 4), noise=x, eta=0.0)
    th.testing.assert_close(back, x0, atol=1e-4, rtol=0)


def test_cond_fn_hooks(base_diffusion, conv_model):
    d = create_diffusion("ddim5")
    seen = []

    def cond_fn(x, t, y=None):
        seen.append(t[0].item())
        return th.ones_like(x) * y

    x = th.randn(2, 4, 4, 4)
    t = th.tensor([2, 2])
    out = d.p_mean_variance(conv_model, x, t)
    shifted = d.condition_mean(cond_fn, out, x, t, model_kwargs={"y": 1.0})
    th.testing.assert_close(shifted, out["mean"] + out["variance"])
    scored = d.condition_score(cond_fn, out, x, t, model_kwargs={"y": 0.0})
    th.testing.assert_close(scored["mean"], out["mean"], atol=1e-5, rtol=1e-5)
    assert seen == [400, 400]
    th.manual_seed(0)
    s = d.ddim_sample_loop(conv_model, (2, 4, 4, 4), cond_fn=cond_fn, model_kwargs={"y": 0.1})
    th.manual_seed(0)
    s2 = d.p_sample_loop(conv_model, (2, 4, 4, 4), cond_fn=cond_fn, model_kwargs={"y": 0.1})
    assert th.isfinite(s).all() and th.isfinite(s2).all()


def test_dpm_solver_oracle_recovers_x0(base_diffusion):
    th.manual_seed(0)
    x0 = th.rand(2, 4, 8, 8) * 1.8 - 0.9
    seen = []
    oracle = _oracle(base_diffusion, x0)

    def model(x, t):
        seen.append(t)
        return oracle(x, t)  # 2C channels: 4 eps + 4 variance

    out = dpm_solver_sample_loop(model, (2, 4, 8, 8), num_steps=20)
    th.testing.assert_close(out, x0, atol=1e-4, rtol=0)
    assert len(seen) == 20 and all(t.dtype == th.long and t.shape == (2,) for t in seen)
    assert seen[0][0].item() == 999 and 0 <= seen[-1][0].item() < 999


def test_dpm_solver_method_uses_base_betas(base_diffusion):
    d = create_diffusion("ddim10")
    np.testing.assert_allclose(d.base_betas, base_diffusion.betas)
    x0 = th.rand(1, 4, 4, 4) * 1.8 - 0.9
    out = d.dpm_solver_sample_loop(_oracle(base_diffusion, x0), (1, 4, 4, 4), num_steps=15)
    th.testing.assert_close(out, x0, atol=1e-4, rtol=0)


def test_dpm_solver_cfg_forward_and_lambda():
    """A CFG-style forward (batch doubled, model_kwargs passed through) and a C-channel lambda."""
    null_class = 10

    def forward_with_cfg(x, t, y, cfg_scale):
        half = x[: len(x) // 2]
        both = th.cat([half, half], 0)
        out = th.cat([0.2 * both + 0.01 * (y[:, None, None, None] != null_class), th.zeros_like(both)], 1)
        eps, rest = out[:, :4], out[:, 4:]
        cond, uncond = th.split(eps, len(eps) // 2, dim=0)
        guided = uncond + cfg_scale * (cond - uncond)
        return th.cat([th.cat([guided, guided], 0), rest], 1)

    th.manual_seed(0)
    z = th.randn(2, 4, 4, 4)
    z = th.cat([z, z], 0)
    y = th.tensor([1, 2, null_class, null_class])
    out = dpm_solver_sample_loop(forward_with_cfg, z.shape, num_steps=10, noise=z,
                                 model_kwargs={"y": y, "cfg_scale": 4.0})
    assert out.shape == (4, 4, 4, 4) and th.isfinite(out).all()

    lam = lambda x, t, **kw: 0.1 * x
    th.manual_seed(1)
    a = dpm_solver_sample_loop(lam, (2, 4, 4, 4), num_steps=5)
    th.manual_seed(1)
    b = dpm_solver_sample_loop(lam, [2, 4, 4, 4], num_steps=5)
    assert th.equal(a, b)
