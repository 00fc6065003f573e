"""Procedural, deterministic, class-labelled shape images and clips (no download needed)."""

import numpy as np
from torch.utils.data import Dataset

from .transforms import to_tensor

# Each shape appears in two colours and each colour on two shapes, so a class needs both cues.
SHAPE_CLASSES = [
    "red circle",
    "green square",
    "blue triangle",
    "yellow cross",
    "blue circle",
    "red square",
    "yellow triangle",
    "green cross",
]
PALETTE = {"red": (225, 45, 40), "green": (40, 190, 70), "blue": (45, 90, 235), "yellow": (240, 215, 40)}
BACKGROUND = (24, 24, 32)
SIZE_FRAC = 0.6  # side of the shape's box relative to the image side
POS_JITTER = 3 / 32  # +-3 px at 32x32, scaled with the image
SIZE_JITTER = 0.1
COLOR_JITTER = 10


def class_names(num_classes: int = len(SHAPE_CLASSES)) -> list[str]:
    """The first `num_classes` class names, validating the count."""
    if not 1 <= num_classes <= len(SHAPE_CLASSES):
        raise ValueError(f"num_classes must be in 1..{len(SHAPE_CLASSES)} for the shapes dataset, got {num_classes}")
    return SHAPE_CLASSES[:num_classes]


def _check_size(image_size: int) -> None:
    """Reject image sizes the dataset does not support."""
    if not (16 <= image_size <= 256 and image_size % 8 == 0):
        raise ValueError(f"image_size must be a multiple of 8 in 16..256, got {image_size}")


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of a unit shape in box coordinates u, v in [-1, 1] (v points down)."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85)
    if shape == "triangle":  # pointing up: apex at v=-1, base at v=0.8
        return (v <= 0.8) & (np.abs(u) <= (v + 1.0) / 1.8)
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.34) & (av <= 1.0)) | ((av <= 0.34) & (au <= 1.0))
    raise ValueError(f"unknown shape {shape!r}")


def _coverage(shape: str, image_size: int, cx: np.ndarray, cy: np.ndarray, side: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage (T, S, S) in [0, 1] of shapes centred at (cx, cy) px with box side `side`."""
    ss = max(1, min(4, 256 // image_size))  # supersampling factor
    n = image_size * ss
    c = (np.arange(n, dtype=np.float32) + 0.5) / ss
    half = (np.asarray(side, np.float32) / 2)[:, None, None]
    u = (c[None, None, :] - np.asarray(cx, np.float32)[:, None, None]) / half
    v = (c[None, :, None] - np.asarray(cy, np.float32)[:, None, None]) / half
    hi = _shape_mask(shape, u, v).astype(np.float32)
    return hi.reshape(len(half), image_size, ss, image_size, ss).mean(axis=(2, 4))


def _composite(alpha: np.ndarray, color: np.ndarray) -> np.ndarray:
    """Blend the shape colour over the plain background: (T, S, S) alpha -> (T, S, S, 3) uint8."""
    bg = np.asarray(BACKGROUND, np.float32)
    img = bg + alpha[..., None] * (color.astype(np.float32) - bg)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _class_style(label: int, image_size: int, rng: np.random.Generator) -> tuple[str, np.ndarray, float]:
    """Shape name, jittered RGB colour and jittered box side (px) for a class."""
    colour, shape = SHAPE_CLASSES[label].split()
    rgb = np.clip(np.asarray(PALETTE[colour]) + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, 3), 0, 255)
    side = image_size * SIZE_FRAC * rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER)
    return shape, rgb, side


def render_shape(label: int, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Render one jittered image of class `label` as uint8 (H, W, 3)."""
    _check_size(image_size)
    shape, rgb, side = _class_style(label, image_size, rng)
    cx, cy = image_size / 2 + rng.uniform(-1, 1, 2) * POS_JITTER * image_size
    return _composite(_coverage(shape, image_size, [cx], [cy], [side]), rgb)[0]


def render_clip(label: int, image_size: int, num_frames: int, rng: np.random.Generator) -> np.ndarray:
    """Render a clip (T, H, W, 3) uint8 of the class shape moving in a straight line inside the frame."""
    return render_clip_and_motion(label, image_size, num_frames, rng)[0]


def direction(d: np.ndarray) -> str:
    """The dominant direction of an (x, y) displacement in image coordinates (y points down)."""
    if abs(d[0]) >= abs(d[1]):
        return "right" if d[0] > 0 else "left"
    return "down" if d[1] > 0 else "up"


def render_clip_and_motion(label: int, image_size: int, num_frames: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """render_clip's clip and the direction the shape moves ("left", "right", "up" or "down")."""
    _check_size(image_size)
    shape, rgb, side = _class_style(label, image_size, rng)
    lo, hi = side / 2 + 1, image_size - side / 2 - 1  # allowed centre range on each axis
    dist = image_size * rng.uniform(0.12, 0.25)
    angle = rng.uniform(0, 2 * np.pi)
    d = np.clip(dist * np.array([np.cos(angle), np.sin(angle)]), lo - hi, hi - lo)
    start = rng.uniform(np.maximum(lo, lo - d), np.minimum(hi, hi - d))
    t = np.linspace(0.0, 1.0, num_frames)[:, None]
    pos = start + t * d  # (T, 2)
    return _composite(_coverage(shape, image_size, pos[:, 0], pos[:, 1], np.full(num_frames, side)), rgb), direction(d)


class ShapesDataset(Dataset):
    """Deterministic class-conditional images of coloured shapes; item i has label i % num_classes.

    Items are {"x": (3, H, W) in [-1, 1], "y": label}, plus "text" (e.g. "a red circle") when `captions`.
    """

    is_latent = False

    def __init__(self, image_size: int = 32, num_classes: int = 8, length: int = 10000, seed: int = 0,
                 flip: bool = False, captions: bool = False):
        _check_size(image_size)
        self.classes = class_names(num_classes)
        self.image_size, self.num_classes, self.length = image_size, num_classes, length
        self.seed, self.flip, self.has_text = seed, flip, captions

    def __len__(self) -> int:
        return self.length

    def render(self, label: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
        """Pixels (H, W, 3) uint8 and caption of one item."""
        img = render_shape(label, self.image_size, rng)
        if self.flip and rng.random() < 0.5:
            img = img[:, ::-1]
        return img, f"a {self.classes[label]}"

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.length:
            raise IndexError(i)
        rng = np.random.default_rng((self.seed, i))
        label = i % self.num_classes
        pixels, caption = self.render(label, rng)
        item = {"x": to_tensor(pixels), "y": label}
        if self.has_text:
            item["text"] = caption
        return item


class ShapesVideoDataset(ShapesDataset):
    """Deterministic clips (3, T, H, W) of a class shape moving in a straight line ("a red circle moving left")."""

    def __init__(self, image_size: int = 32, num_frames: int = 8, num_classes: int = 8, length: int = 10000,
                 seed: int = 0, captions: bool = False):
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        super().__init__(image_size, num_classes, length, seed, captions=captions)
        self.num_frames = num_frames

    def render(self, label: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
        clip, motion = render_clip_and_motion(label, self.image_size, self.num_frames, rng)
        return clip, f"a {self.classes[label]} moving {motion}"
