"""build_dataset(args): the training set chosen by --dataset; `auto` infers it from --data_path.

auto: the built-in shapes when --data_path does not exist (an error for a missing .csv); else a .csv file is a CSV of images (of clips with
--use_video), a folder with index.json a latent cache, a folder with cifar-10-batches-py CIFAR-10, any other folder an
ImageNet-style class folder. Every user mistake found here is a one-line UsageError raised before training starts.
"""

import itertools
import os
import sys

import torch

from opendit.encoders import load_text_encoder
from opendit.errors import UsageError

from .image import Cifar10Dataset, ImageCSVDataset, ImageFolderDataset, cifar_folder
from .latents import is_latent_cache, open_cache
from .robust import SkipBadSamples, error_line, inner_dataset
from .shapes import SHAPE_CLASSES, ShapesDataset, ShapesVideoDataset

KINDS = ("auto", "shapes", "folder", "cifar10", "csv", "latents")
PROBE_TRIES = 8
DEFAULT_DATA_PATH = "./datasets"  # train.py's default: when it does not exist, the built-in shapes data  # items decoded before training to prove the data readable


def infer_kind(args) -> str:
    """The --dataset that `auto` stands for, from what --data_path is."""
    path = args.data_path
    if args.dataset != "auto":
        return args.dataset
    if not os.path.exists(path):
        if path.lower().endswith(".csv"):
            raise UsageError(f"--data_path {path}: no such CSV file")
        if path != DEFAULT_DATA_PATH:  # a mistyped path must not silently train on the built-in data
            raise UsageError(f"--data_path {path}: no such file or folder (the built-in shapes data: leave --data_path out or pass --dataset shapes)")
        return "shapes"
    if os.path.isfile(path):
        if path.lower().endswith(".csv"):
            return "csv"
        raise UsageError(f"--data_path {path}: a file that is not a .csv (pass a CSV, an image folder, CIFAR-10's folder or a latent cache)")
    if is_latent_cache(path):
        return "latents"
    return "cifar10" if cifar_folder(path) else "folder"


def _shapes(args, captions: bool):
    num_classes = min(args.num_classes, len(SHAPE_CLASSES))
    try:
        if args.use_video:
            return ShapesVideoDataset(args.image_size, args.num_frames, num_classes, length=args.dataset_size, seed=0, captions=captions)
        return ShapesDataset(args.image_size, num_classes, length=args.dataset_size, seed=0, captions=captions)
    except ValueError as e:
        raise UsageError(f"--dataset shapes (--image_size {args.image_size}, --num_classes {args.num_classes}): {e}") from None


def _media_paths(dataset) -> list:
    if hasattr(dataset, "rows"):
        return [row.path for row in dataset.rows]
    return [path for path, _ in getattr(dataset, "samples", [])]


def check_readable(dataset, source: str) -> None:
    """Stop before training when no item can be read: the first few items whose files exist must not all fail."""
    paths = _media_paths(dataset)
    existing = (i for i, path in enumerate(paths) if os.path.exists(path)) if paths else iter(range(len(dataset)))
    candidates = list(itertools.islice(existing, PROBE_TRIES))  # stat only until enough files are found
    if not candidates:
        raise UsageError(f"{source}: none of its {len(paths)} files exist (the first: {paths[0]})")
    errors = []
    with torch.random.fork_rng(devices=[]):  # probing leaves the training RNG untouched
        for i in candidates:
            try:
                dataset[i]
                return
            except Exception as e:
                errors.append(error_line(e))
    raise UsageError(f"{source}: none of the first {len(errors)} existing files could be read ({errors[0]})")


def build_dataset(args, train: bool = True):
    """The dataset for the flags; file-backed ones are probed, then wrapped to skip bad items (--on_bad_sample)."""
    kind = infer_kind(args)
    captions = getattr(args, "captions", "auto")
    path = args.data_path
    if kind == "shapes":
        if args.dataset == "shapes" and path != DEFAULT_DATA_PATH and os.path.exists(path):
            print(f"note: --dataset shapes: the built-in data; --data_path {path} is not read", file=sys.stderr)
        return _shapes(args, captions == "on")
    if not os.path.exists(path):
        raise UsageError(f"--data_path {path}: no such file or folder (--dataset {kind})")
    if kind == "csv" and os.path.isdir(path):
        raise UsageError(f"--data_path {path}: a folder; --dataset csv needs a .csv file")
    if kind != "csv" and not os.path.isdir(path):
        raise UsageError(f"--data_path {path}: --dataset {kind} needs a folder")
    if kind == "latents":
        return open_cache(args, train)
    if args.use_video and kind != "csv":
        raise UsageError(f"--use_video trains on clips listed in a CSV; --data_path {path} is a {kind} dataset")
    if kind == "csv":
        if args.use_video:
            dataset = _video_csv(path, args, train)
        else:
            dataset = ImageCSVDataset(path, args.image_size, train, args.num_classes)
    elif kind == "cifar10":
        dataset = Cifar10Dataset(path, args.image_size, train)
    else:
        dataset = ImageFolderDataset(path, args.image_size, train)
    if dataset.num_classes > args.num_classes:
        raise UsageError(f"--data_path {path}: {dataset.num_classes} classes, more than --num_classes {args.num_classes}")
    check_readable(dataset, f"--data_path {path}")
    return SkipBadSamples(dataset, getattr(args, "on_bad_sample", "skip") if train else "drop")


def _video_csv(path: str, args, train: bool):
    """The video CSV dataset for the flags (imported lazily: PyAV loads only for video)."""
    from .video import VideoCSVDataset

    return VideoCSVDataset(path, args.image_size, args.num_frames, args.frame_interval, train, args.num_classes,
                           getattr(args, "short_video", "loop"))


def text_encoder_for(args, dataset, device):
    """The text encoder conditioning on captions (--captions), or None; a latent cache brings its null prompt."""
    captions = getattr(args, "captions", "auto")
    if captions == "on" and not dataset.has_text:
        raise UsageError(f"--captions on: the {type(inner_dataset(dataset)).__name__} at --data_path {args.data_path} has no captions")
    if captions == "off" or not dataset.has_text:
        return None
    if dataset.is_latent:
        return dataset.prompt_cache(device)
    return load_text_encoder(args.text_encoder, device)
