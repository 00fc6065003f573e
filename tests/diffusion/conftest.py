"""Shared fixtures and toy models for the diffusion tests."""

import pytest
import torch as th

from opendit.diffusion import create_diffusion


class ConvModel(th.nn.Module):
    """Tiny deterministic 1x1 conv mapping C channels to 2C (eps + variance halves)."""

    def __init__(self, channels=4):
        super().__init__()
        g = th.Generator().manual_seed(0)
        self.conv = th.nn.Conv2d(channels, 2 * channels, 1)
        with th.no_grad():
            self.conv.weight.copy_(0.1 * th.randn(self.conv.weight.shape, generator=g))
            self.conv.bias.zero_()

    def forward(self, x, t, **kwargs):
        return th.tanh(self.conv(x))


@pytest.fixture
def conv_model():
    return ConvModel(4)


@pytest.fixture(scope="session")
def base_diffusion():
    """The unspaced 1000-step DiT diffusion."""
    return create_diffusion(timestep_respacing="")
