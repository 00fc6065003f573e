"""Cross-check against an independent implementation: diffusers' DDPMScheduler with learned-range variance."""
import pytest
import torch
from diffusers import DDPMScheduler

from opendit.diffusion import create_diffusion


@pytest.mark.parametrize("t", [999, 500, 37, 1])
def test_p_sample_step_matches_diffusers_learned_range(t):
    diffusion = create_diffusion("")
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                              variance_type="learned_range", clip_sample=False)
    g = torch.Generator().manual_seed(t)
    x = torch.randn(2, 4, 8, 8, generator=g)
    output = torch.cat([torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, 4, 8, 8, generator=g) * 2 - 1], dim=1)
    model = lambda x_t, ts, **kw: output  # noqa: E731

    torch.manual_seed(123)
    ours = diffusion.p_sample(model, x, torch.full((2,), t), clip_denoised=False)
    torch.manual_seed(123)
    ref = scheduler.step(output, t, x)
    torch.testing.assert_close(ours["pred_xstart"], ref.pred_original_sample, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours["sample"], ref.prev_sample, rtol=1e-4, atol=1e-4)
