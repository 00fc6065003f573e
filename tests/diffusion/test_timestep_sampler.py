"""Timestep samplers."""

import numpy as np
import pytest
import torch as th

from opendit.diffusion import (
    LossSecondMomentResampler,
    UniformSampler,
    create_diffusion,
    create_named_schedule_sampler,
)


def test_uniform_sampler():
    d = create_diffusion("ddim10")
    s = create_named_schedule_sampler("uniform", d)
    assert isinstance(s, UniformSampler)
    np.random.seed(0)
    idx, w = s.sample(1000, "cpu")
    assert idx.dtype == th.long and idx.min() >= 0 and idx.max() < 10
    assert w.dtype == th.float32 and th.all(w == 1.0)
    assert len(idx.unique()) == 10


def test_loss_second_moment_resampler():
    d = create_diffusion("ddim10")
    s = create_named_schedule_sampler("loss-second-moment", d)
    assert isinstance(s, LossSecondMomentResampler)
    np.testing.assert_array_equal(s.weights(), np.ones(10))
    for _ in range(12):
        ts = th.arange(10)
        s.update_with_local_losses(ts, ts.float() + 1.0)  # single-process fallback
    w = s.weights()
    assert s._warmed_up() and w.sum() == pytest.approx(1.0)
    expected = np.arange(1, 11) / np.arange(1, 11).sum() * (1 - 0.001) + 0.001 / 10
    np.testing.assert_allclose(w, expected)
    np.random.seed(0)
    idx, weights = s.sample(5000, "cpu")
    th.testing.assert_close(weights, th.from_numpy(1 / (10 * w[idx.numpy()])).float())
    assert (idx == 9).float().mean() > (idx == 0).float().mean()


def test_history_keeps_latest_values():
    s = LossSecondMomentResampler(create_diffusion("ddim10"), history_per_term=3)
    s.update_with_all_losses([2] * 5, [1.0, 2.0, 3.0, 4.0, 5.0])
    np.testing.assert_array_equal(s._loss_history[2], [3.0, 4.0, 5.0])


def test_unknown_sampler():
    with pytest.raises(NotImplementedError):
        create_named_schedule_sampler("nope", create_diffusion("ddim10"))
