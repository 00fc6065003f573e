"""The video path end to end, checked for issue 13 (no bug found; these pin what was checked): the patch embedder's
token order is unpatchify's, guidance acts on the channel dim of 5-D outputs, the data's frame order is the clip's
time order, and save_video keeps it."""
import numpy as np
import pytest
import torch
from PIL import Image

from opendit.data import ClassFidelityChecker, ShapesVideoDataset
from opendit.data.checker import _analyse, clip_motion
from opendit.data.shapes import render_clip
from opendit.models import DiT_models
from opendit.utils.media import read_video, save_contact_sheet, save_video


@pytest.mark.parametrize("name", ["VDiT-S/1x2x2", "VDiT-S/2x2x2"])
def test_patch_embed_token_order_is_unpatchify_order(name):
    """Changing one patch of the input changes exactly the token that unpatchify maps back onto that patch."""
    model = DiT_models[name](input_size=8, num_frames=4, num_classes=10, depth=1, hidden_size=32, num_heads=4, learn_sigma=False)
    t, h, w = model.grid
    for k in (0, 5, t * h * w - 1):
        tokens = torch.zeros(1, t * h * w, model.patch_numel * 4)
        tokens[0, k] = 1.0
        mask = model.unpatchify(tokens, torch.Size((1, 4, 4, 8, 8)))  # the pixels of token k
        x = torch.zeros(1, 4, 4, 8, 8)
        changed = (model.x_embedder(x + mask) - model.x_embedder(x)).abs().sum(-1)[0]
        assert changed.nonzero().flatten().tolist() == [k]


def test_cfg_guides_eps_channels_of_video_only():
    model = DiT_models["VDiT-S/1x2x2"](input_size=8, num_frames=4, num_classes=10, depth=1, hidden_size=32, num_heads=4, in_channels=3).eval()  # eval: no label dropout
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    x = torch.randn(1, 3, 4, 8, 8).repeat(2, 1, 1, 1, 1)
    t, y = torch.tensor([10, 10]), torch.tensor([3, 10])
    raw = model(x, t, y)
    out = model.forward_with_cfg(x, t, y, cfg_scale=4.0, cfg_channels=3)
    torch.testing.assert_close(out[0, :3], raw[1, :3] + 4.0 * (raw[0, :3] - raw[1, :3]))
    torch.testing.assert_close(out[:, 3:], raw[:, 3:])  # the learned-sigma half (channel dim 1) is left alone


def test_dataset_frames_are_in_time_order():
    """Item x is (3, T, H, W) with x[:, i] the i-th rendered frame."""
    ds = ShapesVideoDataset(16, num_frames=4, length=4, seed=2)
    clip = render_clip(1, 16, 4, np.random.default_rng((2, 1)))  # item 1: label 1, rng (seed, index)
    x = ds[1]["x"]
    assert x.shape == (3, 4, 16, 16)
    for i in range(4):
        assert torch.equal(x[:, i], torch.from_numpy(clip[i]).float().div(127.5).sub(1).permute(2, 0, 1))


def test_save_video_keeps_frame_order_and_motion(tmp_path):
    ds = ShapesVideoDataset(16, num_frames=4, length=8, seed=3)
    x = torch.stack([ds[i]["x"] for i in range(8)])
    back = torch.stack([torch.from_numpy(read_video(save_video(v, tmp_path / f"{i}.mp4"))).float().div(127.5).sub(1).permute(3, 0, 1, 2) for i, v in enumerate(x)])

    def motion(v):
        n, c, t, h, w = v.shape
        return clip_motion(_analyse(v.movedim(2, 1).reshape(n * t, c, h, w))["center"].view(n, t, 2))["vector"]
    assert (motion(back) - motion(x)).norm(dim=-1).max() < 0.3  # the same displacement, not reversed or shuffled
    assert ClassFidelityChecker().score_video(back, torch.tensor([ds[i]["y"] for i in range(8)]))["motion_accuracy"] == 1.0
    sheet = save_contact_sheet(x, tmp_path / "sheet.png")
    assert Image.open(sheet).size == (2 + 4 * (64 + 2), 2 + 8 * (64 + 2))  # 16 px frames enlarged 4x, a row per clip
