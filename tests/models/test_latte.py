"""Latte (spatial/temporal blocks), the seed's vDiT-*/222 (one 3-D sin-cos table), and VDiT vs DiT on one frame."""
import numpy as np
import pytest
import torch

from opendit.models import DiT_models, Latte_models, VDiT, VDiT3D_models, is_video_model, spatial_patch
from opendit.models.blocks import DiTBlock
from opendit.models.pos_embed import get_3d_sincos_pos_embed
from tiny import randomize  # tests/tiny.py

SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def tiny_latte(name="Latte-S/1x2x2", **kwargs):
    torch.manual_seed(0)
    return DiT_models[name](**{"input_size": 8, "num_frames": 4, "num_classes": 10, "depth": 2, "hidden_size": 32, "num_heads": 4, **kwargs})


def test_registry():
    assert sorted(Latte_models) == sorted(f"Latte-{s}/{p}" for s in SIZES for p in ("1x2x2", "2x2x2"))
    assert sorted(VDiT3D_models) == sorted(f"{v}-{s}/222" for v in ("vDiT", "VDiT") for s in SIZES)
    assert all(is_video_model(name) for name in [*Latte_models, *VDiT3D_models])
    assert {spatial_patch(name) for name in DiT_models if "/2" in name} == {2}
    assert spatial_patch("DiT-S/8") == 8 and spatial_patch("vDiT-XL/222") == 2 and spatial_patch("Latte-XL/1x2x2") == 2


@pytest.mark.parametrize("name", sorted(Latte_models))
def test_every_latte_builds_with_its_size(name):
    with torch.device("meta"):
        model = DiT_models[name](input_size=32, num_frames=16)
    depth, hidden, heads = SIZES[name.split("-")[1].split("/")[0]]
    assert len(model.blocks) == depth and model.hidden_size == hidden and model.num_heads == heads
    assert model.block_kinds == ["spatial", "temporal"] * (depth // 2)
    assert model.grid == ((8 if name.endswith("2x2x2") else 16), 16, 16)
    assert model.final_layer.linear.out_features == 8 * (8 if name.endswith("2x2x2") else 4)


def test_latte_has_vdit_parameters_and_round_trips():
    """Same parameter names and shapes as a VDiT of the same size; a strict state-dict round trip gives the same outputs."""
    model = randomize(tiny_latte())
    vdit = VDiT(input_size=8, num_frames=4, num_classes=10, depth=2, hidden_size=32, num_heads=4)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in vdit.state_dict().items()}
    copy = tiny_latte().double()
    copy.load_state_dict(model.state_dict(), strict=True)
    x, t, y = torch.randn(2, 4, 4, 8, 8, dtype=torch.float64), torch.tensor([1, 500]), torch.tensor([0, 9])
    model.eval(), copy.eval()
    assert torch.equal(model(x, t, y), copy(x, t, y))


def test_zero_init_output_and_cfg_shape():
    model = tiny_latte("Latte-S/2x2x2")
    x = torch.randn(2, 4, 4, 8, 8)
    assert torch.equal(model(x, torch.tensor([1, 2]), torch.tensor([3, 4])), torch.zeros(2, 8, 4, 8, 8))
    out = model.forward_with_cfg(x, torch.tensor([7, 7]), torch.tensor([3, 10]), cfg_scale=4.0)
    assert out.shape == (2, 8, 4, 8, 8) and out.dtype == torch.float32


def test_text_conditioning():
    model = randomize(tiny_latte(num_classes=0, text_dim=16))
    out = model(torch.randn(2, 4, 4, 8, 8, dtype=torch.float64), torch.tensor([1, 2]), text=torch.randn(2, 16, dtype=torch.float64))
    assert out.shape == (2, 8, 4, 8, 8)


@pytest.mark.parametrize("kind", ["spatial", "temporal"])
def test_block_is_a_dit_block_on_regrouped_rows(kind):
    """A spatial block = DiTBlock on (N*t, s, D) rows, a temporal one on (N*s, t, D), with c repeated for each row."""
    model = randomize(tiny_latte())
    block = model.blocks[0 if kind == "spatial" else 1]
    x, c = torch.randn(2, 4, 16, 32, dtype=torch.float64), torch.randn(2, 32, dtype=torch.float64)  # (N, t, s, D)
    rows = x.reshape(8, 16, 32) if kind == "spatial" else x.transpose(1, 2).reshape(32, 4, 32)
    expected = DiTBlock.forward(block, rows, c.repeat_interleave(len(rows) // 2, dim=0))
    expected = expected.reshape(2, 4, 16, 32) if kind == "spatial" else expected.reshape(2, 16, 4, 32).transpose(1, 2)
    torch.testing.assert_close(block(x, c), expected)


def _frame_jacobian_mass(model):
    """mass[i, j] = |d out[frame i] / d in[frame j]| summed (1x2x2 patches: a latent frame is a token frame)."""
    model.eval()
    x = torch.randn(1, 4, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    out = model(x, torch.tensor([10]), torch.tensor([1]))
    mass = torch.zeros(4, 4, dtype=torch.float64)
    for i in range(4):
        (grad,) = torch.autograd.grad(out[:, :, i].sum(), x, retain_graph=True)
        mass[i] = grad.abs().sum(dim=(0, 1, 3, 4))
    return mass


def test_spatial_block_never_mixes_frames_and_temporal_block_does():
    mass = _frame_jacobian_mass(randomize(tiny_latte(depth=1)))
    assert torch.all(mass.diagonal() > 0)
    assert torch.equal(mass - torch.diag(mass.diagonal()), torch.zeros(4, 4, dtype=torch.float64))
    mass = _frame_jacobian_mass(randomize(tiny_latte(depth=2)))
    assert torch.all(mass > 0)


def test_temporal_table_is_added_before_the_first_temporal_block():
    model = randomize(tiny_latte(depth=2))
    seen = []
    model.blocks[1].register_forward_pre_hook(lambda module, args: seen.append(args[2]))
    model.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[2]))
    model(torch.randn(1, 4, 4, 8, 8, dtype=torch.float64), torch.tensor([1]), torch.tensor([1]))
    assert seen[0] is None and torch.equal(seen[1], model.pos_embed_temporal.unsqueeze(2))


def test_one_frame_vdit_is_the_image_dit():
    """DiT's weights in a one-frame VDiT give DiT's outputs; the only difference, VDiT's temporal table (whose frame-0
    row is [sin 0 = 0 | cos 0 = 1]), is zeroed for the comparison."""
    kw = dict(input_size=8, num_classes=10, depth=2, hidden_size=32, num_heads=4)
    dit = randomize(DiT_models["DiT-S/2"](**kw)).eval()
    vdit = DiT_models["VDiT-S/1x2x2"](num_frames=1, **kw).double().eval()
    state = dit.state_dict()
    state["x_embedder.proj.weight"] = state["x_embedder.proj.weight"].unsqueeze(2)  # Conv2d -> Conv3d with kernel t = 1
    torch.testing.assert_close(state.pop("pos_embed")[0], vdit.pos_embed_spatial[0].double())
    vdit.load_state_dict(state, strict=True)
    vdit.pos_embed_temporal.zero_()
    x, t, y = torch.randn(3, 4, 8, 8, dtype=torch.float64), torch.tensor([0, 10, 999]), torch.tensor([1, 2, 10])
    torch.testing.assert_close(vdit(x.unsqueeze(2), t, y)[:, :, 0], dit(x, t, y), rtol=1e-12, atol=1e-12)


def test_vdit_222_builds_at_xl():
    with torch.device("meta"):
        model = DiT_models["vDiT-XL/222"](input_size=32, num_frames=16, depth=2)
    assert model.grid == (8, 16, 16) and model.pos_embed.shape == (1, 2048, 1152) and not model.pos_embed.requires_grad
    assert model.final_layer.linear.out_features == 2 * 2 * 2 * 8 and model.hidden_size == 1152 and model.num_heads == 16
    assert type(DiT_models["VDiT-S/222"](input_size=8, num_frames=4, depth=1)) is type(model)


def test_3d_table_matches_direct_formula():
    """Token (t, h, w), channel k: [sin(t w1) | cos(t w1)] on the first D/4, then [sin(w w2) | cos(w w2) | sin(h w2) |
    cos(h w2)] (MAE's 2-D table: the first half encodes w) on the last 3D/4, w1 = 10000^(-i/(D/8)), w2 = 10000^(-i/(3D/16))."""
    D, (T, H, W) = 64, (3, 2, 5)
    w1 = 10000.0 ** (-np.arange(D // 8) / (D / 8))
    w2 = 10000.0 ** (-np.arange(3 * D // 16) / (3 * D / 16))
    expected = np.array(
        [
            np.concatenate([np.sin(t * w1), np.cos(t * w1), np.sin(w * w2), np.cos(w * w2), np.sin(h * w2), np.cos(h * w2)])
            for t in range(T)
            for h in range(H)
            for w in range(W)
        ]
    )
    np.testing.assert_allclose(get_3d_sincos_pos_embed(D, (T, H, W)), expected, rtol=0, atol=1e-12)
    model = DiT_models["vDiT-S/222"](input_size=8, num_frames=4, num_classes=10, depth=1, hidden_size=64, num_heads=4)
    np.testing.assert_allclose(model.pos_embed[0].numpy(), get_3d_sincos_pos_embed(64, (2, 4, 4)), atol=1e-7)
    out = model(torch.randn(2, 4, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 9]))
    assert out.shape == (2, 8, 4, 8, 8) and "pos_embed" in model.state_dict()
    with pytest.raises(ValueError, match="divisible by 16"):
        get_3d_sincos_pos_embed(40, (2, 2, 2))


@pytest.mark.parametrize("name, num_frames", [("Latte-S/1x2x2", 4), ("Latte-S/2x2x2", 3), ("VDiT-S/1x2x2", 4), ("VDiT-S/2x2x2", 3), ("vDiT-S/222", 4)])
def test_blocks_and_model_return_new_tensors_not_views(name, num_frames):
    """FSDP2 warns on a wrapped module's view output (an in-place op on it would skip the pre-backward all-gather):
    Latte's blocks and the video models' outputs (fp32, where .float() returns the tensor itself; padded frames too)."""
    model = randomize(tiny_latte(name, num_frames=num_frames)).float()
    assert model(torch.randn(2, 4, num_frames, 8, 8), torch.tensor([1, 2]), torch.tensor([3, 4]))._base is None
    if name.startswith("Latte"):
        for block in model.blocks[:2]:  # spatial, temporal
            assert block(torch.randn(2, 2, 16, 32), torch.randn(2, 32))._base is None, block.kind
