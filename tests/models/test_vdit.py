"""VDiT: video shapes, 3-D patches, spatial + temporal sin-cos tables, padding."""
import pytest
import torch

from opendit.models import DiT_models
from opendit.models.pos_embed import get_1d_sincos_pos_embed, get_2d_sincos_pos_embed


def tiny_vdit(name="VDiT-S/1x2x2", **kwargs):
    kw = dict(input_size=8, num_frames=4, num_classes=10, depth=2, hidden_size=32, num_heads=4)
    kw.update(kwargs)
    torch.manual_seed(0)
    return DiT_models[name](**kw)


@pytest.mark.parametrize("name,tokens", [("VDiT-S/1x2x2", 4 * 4 * 4), ("VDiT-S/2x2x2", 2 * 4 * 4)])
def test_video_shapes(name, tokens):
    model = tiny_vdit(name)
    x = torch.randn(2, 4, 4, 8, 8)  # (N, C, T, H, W)
    assert model.embed(x).shape == (2, tokens, 32)
    assert model(x, torch.tensor([1, 2]), torch.tensor([0, 9])).shape == (2, 8, 4, 8, 8)
    assert isinstance(model.x_embedder.proj, torch.nn.Conv3d)


def test_xl_video_config():
    with torch.device("meta"):
        model = DiT_models["VDiT-XL/2x2x2"](input_size=32, num_frames=16)
    assert model.grid == (8, 16, 16) and len(model.blocks) == 28 and model.hidden_size == 1152
    assert model.final_layer.linear.out_features == 2 * 2 * 2 * 8


def test_position_tables_are_spatial_plus_temporal():
    model = tiny_vdit()
    torch.testing.assert_close(model.pos_embed_spatial[0], torch.from_numpy(get_2d_sincos_pos_embed(32, 4)).float())
    torch.testing.assert_close(model.pos_embed_temporal[0], torch.from_numpy(get_1d_sincos_pos_embed(32, 4)).float())
    # With the patch projection zeroed, each token is exactly spatial[h, w] + temporal[t].
    torch.nn.init.zeros_(model.x_embedder.proj.weight)
    torch.nn.init.zeros_(model.x_embedder.proj.bias)
    tokens = model.embed(torch.randn(1, 4, 4, 8, 8)).reshape(4, 16, 32)
    expected = model.pos_embed_temporal[0][:, None] + model.pos_embed_spatial[0][None]
    torch.testing.assert_close(tokens, expected)


def test_unpatchify_inverts_token_layout():
    """A final layer that copies each patch's input values back must reproduce the input video."""
    model = tiny_vdit("VDiT-S/2x2x2", learn_sigma=False)
    x = torch.randn(1, 4, 4, 8, 8)
    pt, ph, pw = model.patch_size
    t, h, w = model.grid
    patches = x.reshape(1, 4, t, pt, h, ph, w, pw).permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(1, t * h * w, -1)
    torch.testing.assert_close(model.unpatchify(patches, x.shape), x)


def test_odd_frame_count_is_padded_and_cropped():
    model = tiny_vdit("VDiT-S/2x2x2", num_frames=5)
    assert model.grid == (3, 4, 4)
    out = model(torch.randn(1, 4, 5, 8, 8), torch.tensor([3]), torch.tensor([1]))
    assert out.shape == (1, 8, 5, 8, 8)


def test_wrong_input_geometry_is_a_clear_error():
    model = tiny_vdit()
    with pytest.raises(ValueError, match="built for"):
        model(torch.randn(1, 4, 8, 8, 8), torch.tensor([3]), torch.tensor([1]))


def test_video_cfg_and_gradients():
    model = tiny_vdit()
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    x = torch.randn(1, 4, 4, 8, 8).repeat(2, 1, 1, 1, 1)
    out = model.forward_with_cfg(x, torch.tensor([10, 10]), torch.tensor([3, 10]), cfg_scale=2.0)
    assert out.shape == (2, 8, 4, 8, 8) and torch.equal(out[0, :3], out[1, :3])
    model(x, torch.tensor([10, 10]), torch.tensor([3, 4])).mean().backward()
    assert model.x_embedder.proj.weight.grad.abs().sum() > 0
