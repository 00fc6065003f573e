"""Video clips decoded with PyAV: seek to the window, decode forward only until it is covered, resize, centre crop.

A clip is `num_frames` frames taken every `frame_interval` frames from a window placed at random (`train`) or in
the middle. Frame indices come from presentation timestamps, so any frame rate works. Videos shorter than the window
follow `short`: "loop" shrinks the stride so the clip spans the whole video (OpenDiT's linspace) and, when the video
has fewer than `num_frames` frames, plays it again from the start; "skip" refuses the video (a bad sample).
"""

import numpy as np
import torch
from torch.utils.data import Dataset

from .robust import error_line
from .table import open_csv
from .transforms import center_crop, random_flip, short_side_size, to_tensor


def clip_indices(total: int, num_frames: int, interval: int, start: float, short: str = "loop") -> np.ndarray:
    """Frame indices (num_frames,) of a clip from a video of `total` frames; start in [0, 1] places the window."""
    span = (num_frames - 1) * interval + 1
    if total < 1:
        raise ValueError("no video frames")
    if total >= span:
        return round(start * (total - span)) + np.arange(num_frames) * interval
    if short == "skip":
        raise ValueError(f"{total} frames, fewer than the {span} that --num_frames {num_frames} x --frame_interval {interval} need")
    if total >= num_frames:
        return np.linspace(0, total - 1, num_frames).round().astype(np.int64)
    return np.arange(num_frames) % total


def _frame_count(container, stream) -> int:
    """Frames in the stream from the container's header or duration x rate (0 when neither is known)."""
    if stream.frames:
        return int(stream.frames)
    rate = float(stream.average_rate or 0)
    if stream.duration:
        seconds = float(stream.duration * stream.time_base)
    else:
        seconds = (container.duration or 0) / 1e6  # container.duration is in microseconds (AV_TIME_BASE)
    return int(seconds * rate)


def _resize(frame, image_size: int) -> np.ndarray:
    """A decoded frame -> uint8 (S, S, 3): swscale bilinear to short side S, then a centre crop."""
    h, w = short_side_size(frame.height, frame.width, image_size)
    return center_crop(frame.reformat(width=w, height=h, format="rgb24", interpolation="BILINEAR").to_ndarray(), image_size)


def _decode_seeking(container, stream, idx: np.ndarray, image_size: int):
    """Seek to the key frame before idx[0] and decode until idx[-1]; None when timestamps do not cover every index."""
    rate, base = float(stream.average_rate), stream.time_base
    origin = stream.start_time or 0
    if idx.min() > 0:
        container.seek(origin + int((idx.min() - 0.5) / rate / base), stream=stream, backward=True)
    wanted, found = set(idx.tolist()), {}
    for frame in container.decode(stream):
        if frame.pts is None:
            return None
        i = round(float((frame.pts - origin) * base) * rate)
        if i in wanted and i not in found:
            found[i] = _resize(frame, image_size)
        if i >= idx.max():
            break
    if len(found) < len(wanted):
        return None
    return np.stack([found[i] for i in idx.tolist()])


def _decode_counting(path: str, num_frames: int, interval: int, image_size: int, start: float, short: str) -> np.ndarray:
    """Fallback without timestamps: count the packets, then decode from the start keeping the planned frames."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        total = sum(1 for packet in container.demux(stream) if packet.size)
    idx = clip_indices(total, num_frames, interval, start, short)
    wanted, found = set(idx.tolist()), {}
    with av.open(path) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                found[i] = _resize(frame, image_size)
            if i >= idx.max():
                break
    if not found:
        raise ValueError("no decodable video frames")
    last = found[max(found)]  # the header over-counted: repeat the last decoded frame
    return np.stack([found.get(i, last) for i in idx.tolist()])


def read_clip(path: str, num_frames: int, interval: int, image_size: int, start: float = 0.5, short: str = "loop") -> np.ndarray:
    """A clip of a video file as uint8 (num_frames, S, S, 3); raises on a missing, corrupt or (short="skip") short file."""
    import av

    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        total = _frame_count(container, stream)
        if total > 0 and stream.average_rate:
            frames = _decode_seeking(container, stream, clip_indices(total, num_frames, interval, start, short), image_size)
            if frames is not None:
                return frames
    return _decode_counting(path, num_frames, interval, image_size, start, short)


class VideoCSVDataset(Dataset):
    """Clips of the videos listed in an OpenDiT CSV: {"x": (3, T, S, S) in [-1, 1], "text": caption[, "y": label]}."""

    is_latent, has_text = False, True

    def __init__(self, csv_path: str, image_size: int, num_frames: int, frame_interval: int, train: bool = True,
                 num_classes: int = 0, short: str = "loop"):
        self.rows, self.labelled, self.num_classes = open_csv(csv_path, num_classes, video=True)
        self.image_size, self.num_frames, self.frame_interval = image_size, num_frames, frame_interval
        self.train, self.short = train, short

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        start = float(torch.rand(())) if self.train else 0.5  # the window's place: random, or the middle
        try:
            frames = read_clip(row.path, self.num_frames, self.frame_interval, self.image_size, start, self.short)
        except Exception as e:
            raise OSError(f"{row.path}: {error_line(e)}") from None
        x = to_tensor(frames)  # (T, S, S, 3) -> (3, T, S, S)
        item = {"x": random_flip(x) if self.train else x, "text": row.caption}
        if self.labelled:
            item["y"] = row.label
        return item
