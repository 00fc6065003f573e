"""Tests for the frozen VAE wrapper, built from tiny configs (nothing is downloaded)."""


import pytest
import torch

from opendit.encoders import VAE, build_vae, tiny_vae

pytestmark = pytest.mark.usefixtures("no_network")  # nothing may download (tests/conftest.py)


@pytest.fixture(scope="module")
def vae():
    """A tiny random KL VAE (downsample 2)."""
    torch.manual_seed(0)
    return tiny_vae()


def test_image_shapes_and_attributes(vae):
    assert (vae.latent_channels, vae.downsample, vae.scaling_factor) == (4, 2, 0.18215)
    x = torch.rand(2, 3, 16, 12) * 2 - 1
    z = vae.encode(x)
    assert z.shape == (2, 4, 8, 6)
    assert vae.decode(z).shape == (2, 3, 16, 12)


def test_downsample_comes_from_config():
    deep = tiny_vae(block_out_channels=(16, 16, 16))
    assert deep.downsample == 4
    assert deep.encode(torch.zeros(1, 3, 16, 16)).shape == (1, 4, 4, 4)


def test_mean_is_scaled_posterior_mean(vae):
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    expected = vae.model.encode(x)[:, :4] * vae.scaling_factor  # moments: (mean, log-variance) on channels
    torch.testing.assert_close(vae.encode(x, sample=False), expected)
    torch.testing.assert_close(vae.decode(expected), vae.model.decode(expected / vae.scaling_factor))


def test_generator_controls_sampling(vae):
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    a = vae.encode(x, generator=torch.Generator().manual_seed(1))
    b = vae.encode(x, generator=torch.Generator().manual_seed(1))
    c = vae.encode(x, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_video_fold_matches_per_frame(vae):
    x = torch.rand(2, 3, 5, 8, 8) * 2 - 1
    z = vae.encode(x, sample=False)
    assert z.shape == (2, 4, 5, 4, 4)
    for t in range(5):
        torch.testing.assert_close(z[:, :, t], vae.encode(x[:, :, t], sample=False), atol=1e-5, rtol=1e-4)
    y = vae.decode(z)
    assert y.shape == x.shape
    for t in range(5):
        torch.testing.assert_close(y[:, :, t], vae.decode(z[:, :, t]), atol=1e-5, rtol=1e-4)


def test_chunking_is_bounded_and_exact(vae, monkeypatch):
    x = torch.rand(2, 3, 5, 8, 8) * 2 - 1
    vae.chunk_size = 100
    full_mean = vae.encode(x, sample=False)
    full_sample = vae.encode(x, generator=torch.Generator().manual_seed(3))
    full_dec = vae.decode(full_mean)
    sizes = []
    encode, decode = vae.model.encode, vae.model.decode
    monkeypatch.setattr(vae.model, "encode", lambda c: sizes.append(len(c)) or encode(c))
    monkeypatch.setattr(vae.model, "decode", lambda c: sizes.append(len(c)) or decode(c))
    try:
        vae.chunk_size = 3
        torch.testing.assert_close(vae.encode(x, sample=False), full_mean, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(
            vae.encode(x, generator=torch.Generator().manual_seed(3)), full_sample, atol=1e-5, rtol=1e-4
        )
        torch.testing.assert_close(vae.decode(full_mean), full_dec, atol=1e-5, rtol=1e-4)
    finally:
        vae.chunk_size = 16
    assert sizes == [3, 3, 3, 1] * 3  # 10 frames in chunks of at most 3


def test_frozen(vae):
    assert all(not p.requires_grad for p in vae.parameters())
    assert not vae.training and not vae.model.training
    vae.train()
    assert not vae.training and not vae.model.training


def test_none_is_identity():
    vae = build_vae("none")
    assert isinstance(vae, VAE) and vae.is_identity
    assert (vae.latent_channels, vae.downsample) == (3, 1)
    x = torch.rand(2, 3, 4, 6, 6)
    assert torch.equal(vae.encode(x), x) and torch.equal(vae.decode(x), x)


def test_load_local_folder(vae, tmp_path):
    vae.model.save_pretrained(tmp_path / "vae")
    loaded = build_vae(str(tmp_path / "vae"), dtype=torch.float64)
    assert next(loaded.parameters()).dtype == torch.float64
    assert all(not p.requires_grad for p in loaded.parameters()) and not loaded.training
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    torch.testing.assert_close(loaded.encode(x, sample=False).float(), vae.encode(x, sample=False))
    assert build_vae(str(tmp_path)).downsample == 2  # a pipeline folder with a vae/ subfolder


@pytest.fixture
def no_from_pretrained(monkeypatch):
    """Make any ``AutoencoderKL.from_pretrained`` call a test failure."""
    from opendit.encoders.autoencoder_kl import AutoencoderKL

    def fail(*args, **kwargs):
        raise AssertionError("from_pretrained should not be called")

    monkeypatch.setattr(AutoencoderKL, "from_pretrained", fail)


@pytest.mark.parametrize("kind", ["missing", "file", "empty"])
def test_bad_path_is_one_line_value_error(tmp_path, no_from_pretrained, kind):
    path = tmp_path / "vae"
    if kind == "file":
        path.write_text("x")
    elif kind == "empty":
        path.mkdir()
    with pytest.raises(ValueError) as info:
        build_vae(str(path))
    message = str(info.value)
    assert str(path) in message and "\n" not in message


def test_unreachable_hub_id_is_one_line_value_error(monkeypatch):
    import opendit.encoders.vae as vae_module

    calls = []

    def offline(repo, local_only):
        calls.append(local_only)
        raise OSError(f"Cannot find the requested files in the disk cache for {repo}.\nCheck your connection.")

    monkeypatch.setattr(vae_module, "_download", offline)
    with pytest.raises(ValueError) as info:
        build_vae("ema")
    message = str(info.value)
    assert "stabilityai/sd-vae-ft-ema" in message and "cannot be reached" in message and "local folder" in message and "\n" not in message
    assert calls == [True]  # local cache first; the hub is not tried when the 3-second probe cannot reach it
