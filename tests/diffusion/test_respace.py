"""Timestep respacing."""

import numpy as np
import pytest
import torch as th

from opendit.diffusion import SpacedDiffusion, create_diffusion, get_named_beta_schedule, space_timesteps
from opendit.diffusion.gaussian_diffusion import LossType, ModelMeanType, ModelVarType


def test_single_section_250():
    steps = space_timesteps(1000, "250")
    assert len(steps) == 250 and 0 in steps and 999 in steps
    stride = 999 / 249
    assert steps == {round(i * stride) for i in range(250)}


def test_ddim_strides():
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim10") == set(range(0, 1000, 100))


def test_multiple_sections():
    steps = space_timesteps(300, "10,15,20")
    assert len(steps) == 45
    assert steps == space_timesteps(300, [10, 15, 20])
    sections = [sorted(s for s in steps if lo <= s < lo + 100) for lo in (0, 100, 200)]
    assert [len(s) for s in sections] == [10, 15, 20]
    assert [(s[0], s[-1]) for s in sections] == [(0, 99), (100, 199), (200, 299)]
    # Uneven split: the first sections take the remainder.
    assert space_timesteps(10, "4,3,3") == {0, 1, 2, 3, 4, 5, 6, 7, 8, 9}


@pytest.mark.parametrize("bad", ["ddim999", "2000", "abc", "5,5,5,5,5,5,5,5,5,5,5"])
def test_invalid_raise(bad):
    with pytest.raises(ValueError):
        space_timesteps(20 if "," in bad else 1000, bad)


def test_spaced_alphas_cumprod_match_base(base_diffusion):
    for spec in ("250", "ddim25", "10,20,30"):
        spaced = create_diffusion(spec)
        keep = sorted(space_timesteps(1000, spec))
        assert spaced.timestep_map == keep
        assert spaced.num_timesteps == len(keep)
        np.testing.assert_allclose(spaced.alphas_cumprod, base_diffusion.alphas_cumprod[keep], rtol=1e-12)
        np.testing.assert_allclose(spaced.base_betas, base_diffusion.betas)


def test_full_respacing_is_identity(base_diffusion):
    assert base_diffusion.timestep_map == list(range(1000))
    np.testing.assert_allclose(base_diffusion.betas, get_named_beta_schedule("linear", 1000), rtol=1e-12)


def test_wrapper_maps_timesteps_once():
    d = SpacedDiffusion(
        use_timesteps={0, 500, 999}, betas=get_named_beta_schedule("linear", 1000),
        model_mean_type=ModelMeanType.EPSILON, model_var_type=ModelVarType.FIXED_SMALL, loss_type=LossType.MSE,
    )
    seen = []

    def model(x, t):
        seen.append(t.tolist())
        return th.zeros_like(x)

    wrapped = d._wrap_model(model)
    assert d._wrap_model(wrapped) is wrapped
    d.p_mean_variance(wrapped, th.zeros(3, 1), th.tensor([0, 1, 2]))
    assert seen == [[0, 500, 999]]
