"""Tests for image/grid/video writers and the mp4 reader."""

import av
import numpy as np
import pytest
import torch
from PIL import Image

from opendit.utils.media import make_grid, read_video, save_image, save_image_grid, save_video, to_uint8

COLOURS = [(1, -1, -1), (-1, 1, -1), (-1, -1, 1), (1, 1, 1), (0, 0, 0), (1, 1, -1)]


def solid(colour, h, w):
    """A (3, H, W) image of one colour in [-1, 1]."""
    return torch.tensor(colour, dtype=torch.float32).view(3, 1, 1).expand(3, h, w).clone()


def leftovers(folder):
    """Temp files left in ``folder``."""
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_to_uint8():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 5).expand(3, 1, 5)
    out = to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (1, 5, 3)
    assert out[0, :, 0].tolist() == [0, 0, 128, 255, 255]
    assert to_uint8(torch.zeros(2, 3, 4, 5)).shape == (2, 4, 5, 3)


def test_grid_layout_and_padding():
    x = torch.stack([solid(COLOURS[i], 6, 7) for i in range(5)])
    grid = make_grid(x, nrow=4, padding=2)
    assert grid.shape == (2 * 8 + 2, 4 * 9 + 2, 3)
    for i in range(5):
        top, left = 2 + (i // 4) * 8, 2 + (i % 4) * 9
        assert (grid[top : top + 6, left : left + 7] == to_uint8(x[i])).all()
    mask = np.ones(grid.shape[:2], bool)
    for i in range(5):
        top, left = 2 + (i // 4) * 8, 2 + (i % 4) * 9
        mask[top : top + 6, left : left + 7] = False
    assert (grid[mask] == 0).all()  # padding and the empty cells are black


def test_grid_matches_torchvision():
    tv = pytest.importorskip("torchvision.utils")
    x = torch.rand(7, 3, 5, 6) * 2 - 1
    expected = to_uint8(tv.make_grid(x, nrow=3, padding=3, pad_value=-1))
    assert np.array_equal(make_grid(x, nrow=3, padding=3), expected)


def test_png_round_trip(tmp_path):
    x = torch.rand(3, 9, 11) * 2 - 1
    path = save_image(x, str(tmp_path / "a" / "b" / "img.png"))
    assert np.array_equal(np.asarray(Image.open(path)), to_uint8(x))
    grid_path = tmp_path / "grid.png"
    save_image_grid(torch.rand(5, 3, 4, 4) * 2 - 1, str(grid_path), nrow=2, padding=1)
    assert Image.open(grid_path).size == (2 * 5 + 1, 3 * 5 + 1)
    assert leftovers(tmp_path) == [] and leftovers(tmp_path / "a" / "b") == []


@pytest.mark.parametrize("codec", [None, "mpeg4"])
def test_mp4_round_trip(tmp_path, codec):
    x = torch.stack([solid(c, 32, 48) for c in COLOURS], dim=1)  # (3, T, H, W)
    path = tmp_path / "out" / "video.mp4"
    assert save_video(x, str(path), fps=8, codec=codec) == str(path)
    frames = read_video(path)
    assert frames.shape == (6, 32, 48, 3) and frames.dtype == np.uint8
    expected = to_uint8(x.movedim(1, 0)).astype(float)
    assert np.abs(frames.astype(float).mean(axis=(1, 2)) - expected.mean(axis=(1, 2))).max() < 12
    with av.open(str(path)) as container:
        assert container.streams.video[0].average_rate == 8
    assert leftovers(path.parent) == []


def test_mp4_odd_size_is_padded_to_even(tmp_path):
    x = torch.stack([solid(c, 17, 23) for c in COLOURS[:4]], dim=1)
    frames = read_video(save_video(x, str(tmp_path / "odd.mp4")))
    assert frames.shape == (4, 18, 24, 3)
    assert np.abs(frames[0].astype(float).mean(axis=(0, 1)) - [255, 0, 0]).max() < 12


def test_single_frame_video_is_png(tmp_path):
    path = save_video(solid(COLOURS[0], 8, 8)[:, None], str(tmp_path / "one.mp4"))
    assert path == str(tmp_path / "one.png")
    assert np.asarray(Image.open(path)).shape == (8, 8, 3)
    assert not (tmp_path / "one.mp4").exists()


def test_interrupted_writes_leave_nothing(tmp_path, monkeypatch):
    target = tmp_path / "img.png"
    save_image(torch.zeros(3, 4, 4), str(target))
    before = target.read_bytes()

    def broken_save(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_image(torch.ones(3, 4, 4), str(target))
    assert target.read_bytes() == before  # the old file is untouched

    real, calls = av.VideoFrame.from_ndarray, []

    def fail_after_first_frame(array, format):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(array, format=format)

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", fail_after_first_frame)
    with pytest.raises(KeyboardInterrupt):
        save_video(torch.zeros(3, 4, 8, 8), str(tmp_path / "v.mp4"))
    assert not (tmp_path / "v.mp4").exists()
    assert leftovers(tmp_path) == []

