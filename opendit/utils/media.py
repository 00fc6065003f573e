"""Save images, image grids and videos from tensors in [-1, 1]; every writer is atomic.

Writers create parent folders and write to a hidden temp file in the same folder,
then ``os.replace`` it, so an interrupted run never leaves a half-written file.
"""

import math
import os
import uuid
from contextlib import contextmanager
from fractions import Fraction

import numpy as np
import torch
from PIL import Image


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Float (C, H, W) or (N, C, H, W) in [-1, 1] -> clamped uint8 numpy HWC / NHWC."""
    x = torch.as_tensor(x).detach().to("cpu", torch.float32)
    if x.ndim not in (3, 4):
        raise ValueError(f"expected (C, H, W) or (N, C, H, W), got shape {tuple(x.shape)}")
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).numpy()


@contextmanager
def atomic_path(path: str):
    """Yield a temp path next to ``path``; move it onto ``path`` only if the block succeeds."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _save_png(array: np.ndarray, path: str) -> str:
    """Write an HWC uint8 array as PNG atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(tmp, format="PNG")
    return os.fspath(path)


def save_image(x: torch.Tensor, path: str) -> str:
    """Save one (C, H, W) image (or a batch of one) in [-1, 1] as PNG; returns the path."""
    if x.ndim == 4 and x.shape[0] == 1:
        x = x[0]
    return _save_png(to_uint8(x), path)


def make_grid(x: torch.Tensor, nrow: int = 4, padding: int = 2) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> uint8 HWC grid, ``nrow`` images per row, black padding (as torchvision)."""
    images = to_uint8(x)
    n, h, w, c = images.shape
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    cell_h, cell_w = h + padding, w + padding
    grid = np.zeros((rows * cell_h + padding, cols * cell_w + padding, c), dtype=np.uint8)
    for i, img in enumerate(images):
        top, left = (i // cols) * cell_h + padding, (i % cols) * cell_w + padding
        grid[top : top + h, left : left + w] = img
    return grid


def save_image_grid(x: torch.Tensor, path: str, nrow: int = 4, padding: int = 2) -> str:
    """Save (N, C, H, W) in [-1, 1] as one PNG grid (see :func:`make_grid`); returns the path."""
    return _save_png(make_grid(x, nrow=nrow, padding=padding), path)


def _pick_codec() -> str:
    """libx264 when this PyAV build has it, else the always-present mpeg4."""
    import av

    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def save_video(x: torch.Tensor, path: str, fps: float = 20, codec: str | None = None) -> str:
    """Save (C, T, H, W) in [-1, 1] as an H.264 yuv420p mp4; returns the path written.

    Odd heights/widths are padded to even by repeating the last row/column.
    A single frame (T == 1) is saved as a PNG next to ``path`` (same name, ``.png``), as OpenDiT did.
    """
    import av

    if x.ndim != 4:
        raise ValueError(f"expected (C, T, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] == 1:
        return save_image(x[:, 0], os.path.splitext(os.fspath(path))[0] + ".png")
    frames = to_uint8(x.movedim(1, 0))  # (T, H, W, C)
    if frames.shape[-1] == 1:
        frames = frames.repeat(3, axis=-1)
    t, h, w, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    codec = codec or _pick_codec()
    with atomic_path(path) as tmp:
        with av.open(tmp, mode="w", format="mp4") as container:
            stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
            stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
            if codec == "libx264":
                stream.options = {"crf": "18"}
            else:
                stream.bit_rate = 8_000_000
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
    return os.fspath(path)


def read_video(path: str) -> np.ndarray:
    """Read a video file into uint8 numpy (T, H, W, 3) RGB."""
    import av

    with av.open(os.fspath(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def save_contact_sheet(videos, path: str, scale: int | None = None, padding: int = 2) -> str:
    """Save clips as one PNG, one row per clip with its frames left to right; returns the path.

    ``videos``: (N, C, T, H, W) in [-1, 1], or a sequence of (C, T, H, W) clips (or of uint8 (T, H, W, 3) arrays,
    as :func:`read_video` returns) of one size. Frames are enlarged by ``scale`` (nearest neighbour; default: the
    smallest integer that makes them at least 64 px high) and separated by ``padding`` black pixels.
    """
    clips = []
    for clip in videos:
        if isinstance(clip, np.ndarray) and clip.dtype == np.uint8:
            frames = clip if clip.ndim == 4 else clip[None]  # (T, H, W, 3)
        else:
            clip = torch.as_tensor(clip)
            if clip.ndim != 4:
                raise ValueError(f"expected (C, T, H, W) clips, got shape {tuple(clip.shape)}")
            frames = to_uint8(clip.movedim(1, 0))  # (T, H, W, C)
        if frames.shape[-1] == 1:
            frames = frames.repeat(3, axis=-1)
        clips.append(frames)
    if not clips:
        raise ValueError("no clips to save")
    t, h, w, c = max(f.shape[0] for f in clips), *clips[0].shape[1:]
    if any(f.shape[1:] != (h, w, c) for f in clips):
        raise ValueError("clips differ in frame size")
    scale = scale or max(1, math.ceil(64 / h))
    h, w = h * scale, w * scale
    sheet = np.zeros((len(clips) * (h + padding) + padding, t * (w + padding) + padding, c), dtype=np.uint8)
    for i, frames in enumerate(clips):
        for j, frame in enumerate(frames):
            top, left = padding + i * (h + padding), padding + j * (w + padding)
            sheet[top : top + h, left : left + w] = frame.repeat(scale, axis=0).repeat(scale, axis=1)
    return _save_png(sheet, path)
