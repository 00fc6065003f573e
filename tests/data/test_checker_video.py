"""The video checker judges motion as well as class: real clips pass, shuffled-frame and static clips fail."""

import pytest
import torch

from opendit.data import ClassFidelityChecker, ShapesVideoDataset
from opendit.data.checker import clip_motion


@pytest.fixture(scope="module")
def checker():
    return ClassFidelityChecker()


def _clips(size, frames, n, seed):
    """n real clips (N, 3, T, H, W), their labels and the direction named in their captions."""
    ds = ShapesVideoDataset(size, num_frames=frames, length=n, seed=seed, captions=True)
    items = [ds[i] for i in range(n)]
    return (torch.stack([it["x"] for it in items]), torch.tensor([it["y"] for it in items]),
            [it["text"].split()[-1] for it in items])


def _shuffled(x, seed=0):
    """Each clip with its frames in a random order that is neither the original nor its reverse."""
    t = x.shape[2]
    g = torch.Generator().manual_seed(seed)
    out = []
    for clip in x:
        order = list(range(t))
        while order in (list(range(t)), list(range(t))[::-1]):
            order = torch.randperm(t, generator=g).tolist()
        out.append(clip[:, order])
    return torch.stack(out)


@pytest.mark.parametrize("size,frames", [(16, 4), (32, 8)])
def test_real_shuffled_static(checker, size, frames):
    x, y, dirs = _clips(size, frames, 64, seed=11)
    real = checker.score_video(x, y, directions=dirs)
    assert real["accuracy"] >= 0.97 and real["motion_accuracy"] == 1.0
    assert checker.score_video(_shuffled(x), y)["accuracy"] <= 0.05  # right class, wrong frame order
    static = checker.score_video(x[:, :, :1].expand_as(x).contiguous(), y)
    assert static["class_accuracy"] >= 0.97 and static["accuracy"] == 0.0  # right class, no motion
    assert checker.score_video(x, (y + 1) % 8)["accuracy"] <= 0.05  # right motion, wrong class


def test_reversed_clip_moves_the_other_way(checker):
    """Played backwards a clip is still a straight-line motion, but in the opposite direction to its caption."""
    x, y, dirs = _clips(16, 4, 32, seed=3)
    back = x.flip(2)
    assert checker.score_video(back, y)["accuracy"] >= 0.97
    assert checker.score_video(back, y, directions=dirs)["accuracy"] <= 0.05
    assert checker.score_video(back, y, directions=[None] * len(dirs))["accuracy"] >= 0.97


def test_too_small_or_curved_motion_fails(checker):
    """Stop-start motion, or a fraction of the data's displacement, is not the data's motion."""
    x, y, _ = _clips(16, 4, 32, seed=4)
    stop_start = x[:, :, [0, 0, 3, 3]]  # the data's displacement, but not at constant speed
    assert checker.score_video(stop_start, y)["accuracy"] <= 0.05
    half = x[:, :, [0, 0, 1, 1]]  # a third of it, stop-start
    assert checker.score_video(half, y)["accuracy"] <= 0.05
    x8, y8, _ = _clips(16, 8, 32, seed=4)
    slow = x8[:, :, :4]  # constant speed, but 3/7 of the data's displacement: mostly below its range
    assert checker.score_video(slow, y8)["motion_accuracy"] <= 0.2


def test_clip_motion_line():
    """clip_motion fits a constant-speed line: exact points have zero deviation and the right displacement."""
    s = torch.linspace(0, 1, 5)[:, None]
    centers = (torch.tensor([4.0, 6.0]) + s * torch.tensor([3.0, -4.0]))[None]
    m = clip_motion(centers)
    assert m["displacement"].item() == pytest.approx(5.0, abs=1e-4) and m["deviation"].item() < 1e-4
    assert torch.allclose(m["vector"][0], torch.tensor([3.0, -4.0]), atol=1e-4)
