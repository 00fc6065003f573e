"""Write the demo clips of videos/ and videos/demo.csv (OpenDiT's headerless rows plus a label: `path,caption,label`).

`python -m opendit.data.make_demo_videos [--output videos]`. The clips are deterministic and small (moving shapes on a
flat background, H.264): square and portrait frames, 12 to 30 fps, 24 to 64 frames, so they exercise the reader too.
The encoder's bytes can differ between runs for the same frames (x264 on narrow frames), so a clip already there that
decodes to the same frames is kept as it is.
"""

import argparse
import csv
import os

import numpy as np

from opendit.utils.media import read_video, save_video

from .shapes import SHAPE_CLASSES, render_clip_and_motion
from .transforms import to_tensor

# (class, side, frames, fps, width kept of the side): one portrait clip, one long clip, one low frame rate.
CLIPS = [(0, 128, 48, 24, 1.0), (5, 128, 48, 24, 1.0), (2, 128, 64, 30, 1.0), (7, 128, 24, 12, 1.0), (4, 128, 40, 20, 0.75)]


def write_clip(x, path: str, fps: float) -> None:
    """save_video, but an existing file that decodes to the same frames is left untouched."""
    if not os.path.exists(path):
        save_video(x, path, fps=fps)
        return
    new = save_video(x, os.path.join(os.path.dirname(path) or ".", f".new-{os.path.basename(path)}"), fps=fps)
    if np.array_equal(read_video(new), read_video(path)):
        os.remove(new)
    else:
        os.replace(new, path)


def make_demo_videos(output: str = "videos", seed: int = 0) -> list:
    """Write the clips and demo.csv into `output`; returns the CSV rows (path relative to the CSV, caption, shapes class)."""
    rows = []
    for n, (label, side, frames, fps, keep) in enumerate(CLIPS):
        clip, motion = render_clip_and_motion(label, side, frames, np.random.default_rng((seed, n)))  # (T, S, S, 3)
        width = int(side * keep) // 2 * 2
        clip = clip[:, :, (side - width) // 2 : (side - width) // 2 + width]  # portrait when keep < 1
        name = f"{SHAPE_CLASSES[label].replace(' ', '-')}-{motion}.mp4"
        write_clip(to_tensor(clip), os.path.join(output, name), fps)  # (3, T, H, W) in [-1, 1]
        rows.append((name, f"a {SHAPE_CLASSES[label]} moving {motion}", label))
    with open(os.path.join(output, "demo.csv"), "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", default="videos", help="folder for the clips and demo.csv")
    args = parser.parse_args(argv)
    for name, caption, _ in make_demo_videos(args.output):
        print(f"{os.path.join(args.output, name)}  {os.path.getsize(os.path.join(args.output, name)) // 1024} KiB  {caption}")


if __name__ == "__main__":
    main()
