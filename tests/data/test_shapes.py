"""Tests for the built-in shapes datasets and the class-fidelity checker."""

from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from opendit.data import SHAPE_CLASSES, ClassFidelityChecker, ShapesDataset, ShapesVideoDataset, class_names
from opendit.data import shapes


def _batch(ds, n):
    """Stack the first n items of a dataset into (x, y) tensors."""
    items = [ds[i] for i in range(n)]
    return torch.stack([item["x"] for item in items]), torch.tensor([item["y"] for item in items])


@pytest.fixture(scope="module")
def checker():
    """One checker shared by the tests (references are fitted lazily per image size)."""
    return ClassFidelityChecker()


@pytest.fixture(scope="module")
def real32():
    """Real 32x32 images from a seed different from the checker's reference seed."""
    return _batch(ShapesDataset(32, length=160, seed=7), 160)


def test_classes_need_both_colour_and_shape():
    """Every (colour, shape) is unique, yet each colour and each shape is shared by several classes."""
    pairs = [name.split() for name in SHAPE_CLASSES]
    assert len(set(map(tuple, pairs))) == len(pairs) == 8
    assert all(n >= 2 for n in Counter(c for c, _ in pairs).values())
    assert all(n >= 2 for n in Counter(s for _, s in pairs).values())
    assert class_names(4) == SHAPE_CLASSES[:4]


def test_determinism():
    """Same (seed, index) gives an identical tensor; another seed gives a different one."""
    a, b = ShapesDataset(32, seed=0), ShapesDataset(32, seed=0)
    assert torch.equal(a[5]["x"], b[5]["x"]) and torch.equal(a[5]["x"], a[5]["x"])
    assert not torch.equal(a[5]["x"], ShapesDataset(32, seed=1)[5]["x"])
    assert not torch.equal(a[5]["x"], a[13]["x"])  # same class, different jitter
    flip = ShapesDataset(32, flip=True)
    assert torch.equal(flip[3]["x"], flip[3]["x"])


@pytest.mark.parametrize("size", [16, 32, 64])
def test_shapes_range_and_border(size):
    """Items are float32 (3, H, W) in [-1, 1], with the shape fully inside the frame."""
    x, y = _batch(ShapesDataset(size, length=16), 16)
    assert x.shape == (16, 3, size, size) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0.1
    bg = torch.tensor(shapes.BACKGROUND) / 127.5 - 1
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], dim=-1)
    assert torch.allclose(border, bg[None, :, None].expand_as(border), atol=1e-6)
    assert y.tolist() == [i % 8 for i in range(16)]


def test_labels_balanced():
    """Labels cycle through the classes, so every class has the same count."""
    counts = Counter(ShapesDataset(16, num_classes=5, length=50)[i]["y"] for i in range(50))
    assert counts == {c: 10 for c in range(5)}


def test_bad_arguments():
    """Too many classes or an unsupported size raise a one-line ValueError."""
    with pytest.raises(ValueError, match="num_classes"):
        ShapesDataset(num_classes=len(SHAPE_CLASSES) + 1)
    with pytest.raises(ValueError):
        ShapesDataset(num_classes=0)
    with pytest.raises(ValueError, match="image_size"):
        ShapesDataset(image_size=20)
    with pytest.raises(ValueError):
        ShapesVideoDataset(num_classes=9)


@pytest.mark.parametrize("size", [16, 32, 64])
def test_checker_real_images(checker, size):
    """Real images of every class are recognised at several sizes."""
    x, y = _batch(ShapesDataset(size, length=160, seed=7), 160)
    assert checker.score(x, y) >= 0.98
    per = checker.per_class(x, y)
    assert set(per) == set(SHAPE_CLASSES) and min(per.values()) >= 0.9


def test_checker_rejects_noise_and_flat(checker):
    """Gaussian noise is rejected (mostly -1); flat single-colour images are always -1."""
    torch.manual_seed(0)
    noise = torch.randn(160, 3, 32, 32)
    y = torch.arange(160) % 8
    assert checker.score(noise, y) <= 0.2
    assert (checker.predict(noise) == -1).float().mean() >= 0.9
    flat = (torch.rand(64, 3, 1, 1) * 2 - 1).expand(64, 3, 32, 32)
    assert (checker.predict(flat) == -1).all()


def test_checker_measures_pixels(checker, real32):
    """Images of class A relabelled as class B score ~0: the checker reads pixels, not labels."""
    x, y = real32
    assert checker.score(x, (y + 1) % 8) <= 0.02
    assert checker.score(x, (y + 4) % 8) <= 0.02  # same shape, other colour


def test_checker_needs_colour_and_shape(checker):
    """A known shape in a known colour that is not a class (e.g. red triangle) is rejected."""
    alpha = shapes._coverage("triangle", 32, [16.0], [16.0], [19.0])
    red_triangle = shapes._composite(alpha, np.array(shapes.PALETTE["red"]))
    alpha = shapes._coverage("circle", 32, [16.0], [16.0], [19.0])
    green_circle = shapes._composite(alpha, np.array(shapes.PALETTE["green"]))
    x = torch.from_numpy(np.concatenate([red_triangle, green_circle])).float().div(127.5).sub(1).permute(0, 3, 1, 2)
    assert (checker.predict(x) == -1).all()


def test_checker_robust_to_noise_and_blur(checker, real32):
    """Real images with added Gaussian noise (std 0.1) or a 3x3 blur are still recognised."""
    x, y = real32
    torch.manual_seed(0)
    assert checker.score(x + 0.1 * torch.randn_like(x), y) >= 0.9
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    assert checker.score(blurred, y) >= 0.9


def test_checker_fit_subset():
    """fit() on a dataset with fewer classes gives a working checker for those classes."""
    ch = ClassFidelityChecker(num_classes=4).fit(ShapesDataset(32, num_classes=4, length=64, seed=3), n_per_class=8)
    x, y = _batch(ShapesDataset(32, num_classes=4, length=64, seed=9), 64)
    assert ch.score(x, y) >= 0.98


def test_video_dataset_and_checker(checker):
    """Clips are (3, T, H, W) in [-1, 1], recognised, and moving; frozen clips are recognised but do not count."""
    ds = ShapesVideoDataset(32, num_frames=8, length=48, seed=5)
    x, y = _batch(ds, 48)
    assert x.shape == (48, 3, 8, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(ds[3]["x"], ShapesVideoDataset(32, num_frames=8, length=48, seed=5)[3]["x"])
    res = checker.score_video(x, y)
    assert res["accuracy"] >= 0.95 and res["motion_fraction"] >= 0.9
    static = checker.score_video(x[:, :, :1].expand_as(x), y)
    assert static["motion_fraction"] == 0.0 and static["class_accuracy"] >= 0.95 and static["accuracy"] == 0.0
    assert checker.score_video(x, (y + 1) % 8)["accuracy"] <= 0.05


def test_captions():
    """With captions, items carry "text" naming the class (and the motion of clips); without, no "text"."""
    assert "text" not in ShapesDataset(16, length=4)[0]
    assert ShapesDataset(16, length=4, captions=True)[1]["text"] == "a green square"
    caption = ShapesVideoDataset(16, num_frames=3, length=4, captions=True)[2]["text"]
    assert caption.startswith("a blue triangle moving ") and caption.split()[-1] in ("left", "right", "up", "down")
