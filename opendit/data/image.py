"""Image datasets: an ImageNet-style class folder, a local CIFAR-10 copy, and a CSV of captioned images.

Every item is a dict: "x" float (3, S, S) in [-1, 1] (ADM centre crop, then a random horizontal flip when
`train`), "y" the int64 class label when the data has labels, "text" the caption when it has captions.
"""

import os
import pickle

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from opendit.errors import UsageError

from .robust import error_line
from .table import IMAGE_EXTENSIONS, open_csv
from .transforms import center_crop_arr, random_flip, to_tensor

CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]


def load_image(path: str, image_size: int, train: bool) -> torch.Tensor:
    """An image file -> (3, S, S) in [-1, 1]; any decoding problem raises with the path in the message."""
    try:
        with Image.open(path) as image:
            arr = center_crop_arr(image.convert("RGB"), image_size)
    except Exception as e:
        raise OSError(f"{path}: cannot read the image ({error_line(e)})") from None
    x = to_tensor(arr)  # (3, S, S)
    return random_flip(x) if train else x


class ImageFolderDataset(Dataset):
    """root/<class>/**/<image>: classes are the sorted sub-folder names, labelled 0..K-1 (torchvision's ImageFolder)."""

    is_latent, has_text = False, False

    def __init__(self, root: str, image_size: int, train: bool = True):
        self.root, self.image_size, self.train = root, image_size, train
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        if not self.classes:
            raise UsageError(f"--data_path {root}: no class sub-folders (expected {root}/<class>/<image>)")
        self.samples = []  # (path, label)
        for label, name in enumerate(self.classes):
            for folder, _, files in sorted(os.walk(os.path.join(root, name), followlinks=True)):
                self.samples += [(os.path.join(folder, f), label) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not self.samples:
            raise UsageError(f"--data_path {root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in its {len(self.classes)} class folders")
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        path, label = self.samples[i]
        return {"x": load_image(path, self.image_size, self.train), "y": label}


class _NumpyOnly(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers only, so a CIFAR batch file can never run code."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batch(path: str) -> tuple:
    try:
        with open(path, "rb") as f:
            batch = _NumpyOnly(f, encoding="latin1").load()
        data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, 32, 32, 3)
        return data, np.asarray(batch["labels"], dtype=np.int64)
    except Exception as e:
        raise UsageError(f"--data_path {path}: not a CIFAR-10 python batch ({type(e).__name__}: {e})") from None


def cifar_folder(path: str) -> str:
    """The cifar-10-batches-py folder at or inside path, or '' when there is none."""
    for folder in (path, os.path.join(path, CIFAR_FOLDER)):
        if os.path.isfile(os.path.join(folder, CIFAR_TRAIN[0])):
            return folder
    return ""


class Cifar10Dataset(Dataset):
    """CIFAR-10's 50,000 training images from a local copy in torchvision's format (never downloaded)."""

    is_latent, has_text, num_classes = False, False, 10

    def __init__(self, root: str, image_size: int, train: bool = True):
        folder = cifar_folder(root)
        if not folder:
            raise UsageError(f"--data_path {root}: no {CIFAR_FOLDER}/{CIFAR_TRAIN[0]} (torchvision's CIFAR-10 layout)")
        missing = [name for name in CIFAR_TRAIN if not os.path.isfile(os.path.join(folder, name))]
        if missing:
            raise UsageError(f"--data_path {root}: {CIFAR_FOLDER} lacks {', '.join(missing)}")
        batches = [_read_cifar_batch(os.path.join(folder, name)) for name in CIFAR_TRAIN]
        self.images = np.concatenate([b[0] for b in batches])  # (N, 32, 32, 3) uint8
        self.labels = np.concatenate([b[1] for b in batches])  # (N,)
        self.image_size, self.train = image_size, train

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        x = to_tensor(center_crop_arr(Image.fromarray(self.images[i]), self.image_size))  # (3, S, S)
        return {"x": random_flip(x) if self.train else x, "y": int(self.labels[i])}


class ImageCSVDataset(Dataset):
    """Captioned images listed in a CSV (path,caption[,label]) for text-to-image training."""

    is_latent, has_text = False, True

    def __init__(self, csv_path: str, image_size: int, train: bool = True, num_classes: int = 0):
        self.rows, self.labelled, self.num_classes = open_csv(csv_path, num_classes, video=False)
        self.image_size, self.train = image_size, train

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        item = {"x": load_image(row.path, self.image_size, self.train), "text": row.caption}
        if self.labelled:
            item["y"] = row.label
        return item
