"""Pixel transforms shared by the datasets: ADM centre crop, short-side resize, random flip, uint8 -> [-1, 1]."""

import numpy as np
import torch
from PIL import Image


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's crop: halve with BOX while the short side >= 2 * size, BICUBIC to short side == size, centre crop."""
    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    h, w = short_side_size(image.height, image.width, image_size)
    return center_crop(np.array(image.resize((w, h), resample=Image.BICUBIC)), image_size)  # (S, S, 3), writable


def short_side_size(height: int, width: int, image_size: int) -> tuple[int, int]:
    """(height, width) scaled so that the short side equals image_size (the long side never below it)."""
    scale = image_size / min(height, width)
    return max(image_size, round(height * scale)), max(image_size, round(width * scale))


def center_crop(frames: np.ndarray, image_size: int) -> np.ndarray:
    """Centre image_size x image_size crop of (..., H, W, C) frames."""
    h, w = frames.shape[-3:-1]
    top, left = (h - image_size) // 2, (w - image_size) // 2
    return frames[..., top : top + image_size, left : left + image_size, :]


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float32 channels-first (3, ..., H, W) in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(array)).float().div_(127.5).sub_(1.0)
    return x.movedim(-1, 0)


def random_flip(x: torch.Tensor, p: float = 0.5) -> torch.Tensor:
    """Mirror the last (width) axis with probability p; one draw for the whole image or clip."""
    return x.flip(-1) if torch.rand(()) < p else x
