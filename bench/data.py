"""Data-loading throughput: decoded images/s and clips/s through the training DataLoader, for several worker counts.

  python bench/data.py --workers 0,1,2                      # synthetic ImageNet-like JPEGs and UCF101-like mp4s
  python bench/data.py --data_path my.csv --use_video        # your own data (a CSV, an image folder)

Synthetic data is written once to --cache (JPEG 500x375; H.264 320x240, 25 fps, 5 s, key frame every 12 frames).
Clips are read by seeking (the training path); the row "whole file" decodes every frame of each video instead, as
torchvision.io.read_video does, for comparison.
"""

import argparse
import os
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from opendit.data.build import build_dataset  # noqa: E402
from opendit.data.transforms import center_crop, short_side_size, to_tensor  # noqa: E402
from opendit.data.video import clip_indices  # noqa: E402
from opendit.utils.media import read_video  # noqa: E402


def synthetic_images(folder: str, n: int) -> str:
    """n JPEGs of 500x375 (smooth colour plus noise) in 10 class folders."""
    rng = np.random.default_rng(0)
    for i in range(n):
        path = os.path.join(folder, f"class{i % 10}", f"{i:05d}.jpg")
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            base = np.linspace(0, 255, 500)[None, :, None] * rng.uniform(0.3, 1, 3)
            noise = rng.normal(0, 20, (375, 500, 3))
            Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(path, quality=90)
    return folder


def synthetic_videos(folder: str, n: int, seconds: float = 5, fps: int = 25) -> str:
    """n H.264 mp4s of 320x240 (a moving gradient plus noise) and a CSV listing them."""
    import av

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        path = os.path.join(folder, f"clip{i:04d}.mp4")
        rows.append(f"clip{i:04d}.mp4,synthetic clip {i}\n")
        if os.path.exists(path):
            continue
        with av.open(path, "w") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt, stream.gop_size = 320, 240, "yuv420p", 12
            for t in range(int(seconds * fps)):
                x = np.linspace(0, 4 * np.pi, 320)[None, :, None] + t / 5
                frame = 128 + 100 * np.sin(x + np.arange(3)) + rng.normal(0, 12, (240, 320, 3))
                container.mux(stream.encode(av.VideoFrame.from_ndarray(np.clip(frame, 0, 255).astype(np.uint8), format="rgb24")))
            container.mux(stream.encode())
    with open(os.path.join(folder, "clips.csv"), "w") as f:
        f.writelines(rows)
    return os.path.join(folder, "clips.csv")


def throughput(dataset, workers: int, batch_size: int, limit: int) -> float:
    """Items per second through a DataLoader like train.py's (after one warm-up batch)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    seen, start = 0, None
    for batch in loader:
        if start is None:
            start = time.perf_counter()  # the first batch pays for the worker start-up
            continue
        seen += len(batch["x"])
        if seen >= limit:
            break
    return seen / (time.perf_counter() - start)


class WholeFile(torch.utils.data.Dataset):
    """The same clips, decoding every frame of the file first (what a non-seeking reader does)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        ds = self.dataset
        frames = read_video(ds.rows[i].path)  # (N, H, W, 3)
        idx = clip_indices(len(frames), ds.num_frames, ds.frame_interval, float(torch.rand(())))
        h, w = short_side_size(*frames.shape[1:3], ds.image_size)
        clip = torch.from_numpy(frames[idx]).permute(0, 3, 1, 2).float()  # (T, 3, H, W)
        clip = torch.nn.functional.interpolate(clip, size=(h, w), mode="bilinear", antialias=True)
        return {"x": to_tensor(center_crop(clip.permute(0, 2, 3, 1).round().clamp(0, 255).byte().numpy(), ds.image_size)), "text": ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    parser.add_argument("--data_path", default=None, help="a CSV or image folder instead of the synthetic data")
    parser.add_argument("--use_video", action="store_true", help="--data_path is a video CSV")
    parser.add_argument("--cache", default="/tmp/opendit-bench-data", help="where the synthetic data is written")
    parser.add_argument("--images", type=int, default=256, help="synthetic images")
    parser.add_argument("--videos", type=int, default=32, help="synthetic videos")
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--num_frames", type=int, default=16)
    parser.add_argument("--frame_interval", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--items", type=int, default=128, help="items timed per row (after a warm-up batch)")
    args = parser.parse_args()

    def dataset(path: str, video: bool):
        flags = SimpleNamespace(data_path=path, dataset="auto", use_video=video, image_size=args.image_size, num_frames=args.num_frames,
                                frame_interval=args.frame_interval, num_classes=10**6, on_bad_sample="skip", short_video="loop", captions="auto")
        return build_dataset(flags, train=True)

    suites = []
    if args.data_path:
        suites.append(("clips" if args.use_video else "images", dataset(args.data_path, args.use_video)))
    else:
        suites.append(("images (JPEG 500x375)", dataset(synthetic_images(os.path.join(args.cache, "images"), args.images), False)))
        clips = dataset(synthetic_videos(os.path.join(args.cache, "videos"), args.videos), True)
        suites += [("clips (mp4 320x240, seeking)", clips), ("clips (mp4 320x240, whole file)", WholeFile(clips.dataset))]
    print(f"image_size {args.image_size}, clips of {args.num_frames} frames every {args.frame_interval}, batch {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs")
    print(f"| data | workers | items/s |\n|---|---|---|")
    for name, ds in suites:
        for workers in [int(w) for w in args.workers.split(",")]:
            limit = min(args.items, len(ds) - args.batch_size)
            print(f"| {name} | {workers} | {throughput(ds, workers, args.batch_size, limit):.1f} |", flush=True)


if __name__ == "__main__":
    main()
