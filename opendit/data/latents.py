"""The latent cache written by `preprocess.py latents`: sharded .safetensors files plus index.json.

Shard `shard-NNNNNN.safetensors` holds, for its n items, the VAE posterior scaled as vae.encode scales it:
"mean" and "std" (n, C, [T,] h, w) of the pixels and "mean_flip"/"std_flip" of their horizontal mirror (both
flips, as fast-DiT stores), "index" (n,) the source item, "y" (n,) labels when the source has them and "text_emb"
(n, D) pooled caption embeddings when it has captions. A pixel-space cache (--vae none) stores no std. index.json
lists the shards and the metadata: latent shape, VAE, scaling, text encoder, null-prompt embedding, image size,
frames, classes. It is written last, so its presence marks a complete cache.
"""

import bisect
import itertools
import json
import os

import torch
from torch.utils.data import Dataset

from opendit.errors import UsageError

INDEX = "index.json"
FORMAT = "opendit-latents"


def shard_name(k: int) -> str:
    return f"shard-{k:06d}.safetensors"


def is_latent_cache(path: str) -> bool:
    return os.path.isfile(os.path.join(path, INDEX))


def source_id(name: str) -> str:
    """A model named on the command line as a cache records it: a local folder by its absolute path, else as given."""
    path = os.path.expanduser(str(name).strip())
    return os.path.abspath(path) if os.path.exists(path) else str(name).strip()


def vae_id(name: str) -> str:
    """--vae as a cache records it: ema/mse by their hub id, else source_id."""
    from opendit.encoders.vae import HUB_IDS

    return HUB_IDS.get(str(name).strip().lower(), source_id(name))


def read_index(folder: str) -> dict:
    """index.json of a cache, with a one-line error when it is missing or not ours."""
    path = os.path.join(folder, INDEX)
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"--data_path {folder}: no readable {INDEX} ({e.__class__.__name__}); run preprocess.py latents to the end") from None
    if meta.get("format") != FORMAT:
        raise UsageError(f"{path}: not an OpenDiT latent cache index")
    return meta


def check_shard(path: str, count: int) -> None:
    """A shard whose header and size agree (safetensors checks that the data fill the file) with index.json's count."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            rows = f.get_slice("mean").get_shape()[0]
    except Exception as e:  # truncated, overwritten, not safetensors
        raise UsageError(f"{path}: unreadable latent cache shard ({type(e).__name__}: {e}); rerun preprocess.py latents".split("\n")[0]) from None
    if rows != count:
        raise UsageError(f"{path}: {rows} items, but {INDEX} lists {count}; rerun preprocess.py latents")


class PromptCache:
    """Stands in for the text encoder on a latent cache: it knows only the empty prompt, from index.json."""

    def __init__(self, null_embedding: list, device):
        self.null = torch.tensor(null_embedding, dtype=torch.float32, device=device)[None]  # (1, D)
        self.dim = self.null.shape[1]

    def null_embedding(self) -> torch.Tensor:
        return self.null

    def encode(self, prompts: list) -> torch.Tensor:
        if any(prompts):
            raise ValueError("a latent cache has no text encoder: only the empty prompt can be encoded")
        return self.null.expand(len(prompts), -1)


class LatentDataset(Dataset):
    """Items of a latent cache: {"x": posterior mean, "x_std": its std, ["y"], ["text_emb"]}, one of the two flips
    drawn at random when `train` (prepare_batch samples x + x_std * noise)."""

    is_latent = True

    def __init__(self, folder: str, train: bool = True):
        self.folder, self.train = folder, train
        self.meta = read_index(folder)
        self.files = [os.path.join(folder, s["file"]) for s in self.meta["shards"]]
        missing = [f for f in self.files if not os.path.isfile(f)]
        if missing:
            raise UsageError(f"--data_path {folder}: {len(missing)} shards of {INDEX} are missing (first: {os.path.basename(missing[0])})")
        for path, shard in zip(self.files, self.meta["shards"]):
            check_shard(path, shard["count"])
        self.ends = list(itertools.accumulate(s["count"] for s in self.meta["shards"]))  # for item -> (shard, row)
        if not self.ends or self.ends[-1] == 0:
            raise UsageError(f"--data_path {folder}: the latent cache holds no items")
        self.has_text = self.meta.get("text_dim", 0) > 0
        self.has_labels = self.meta.get("has_labels", False)
        self.num_classes = self.meta.get("num_classes", 0)
        self.handles = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "handles": {}}  # open files stay in their process

    def __len__(self) -> int:
        return self.ends[-1]

    def prompt_cache(self, device) -> PromptCache:
        return PromptCache(self.meta["null_text_emb"], device)

    def _shard(self, k: int):
        if k not in self.handles:
            from safetensors import safe_open

            self.handles[k] = safe_open(self.files[k], framework="pt")
        return self.handles[k]

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = bisect.bisect_right(self.ends, i)
        row = i - (self.ends[k - 1] if k else 0)
        shard = self._shard(k)
        suffix = "_flip" if self.train and torch.rand(()) < 0.5 else ""

        def get(name: str) -> torch.Tensor:
            return shard.get_slice(name)[row : row + 1][0]

        x = get("mean" + suffix).float()
        item = {"x": x, "x_std": get("std" + suffix).float() if self.meta["stochastic"] else torch.zeros_like(x)}
        if self.has_labels:
            item["y"] = int(get("y"))
        if self.has_text:
            item["text_emb"] = get("text_emb").float()
        return item


def open_cache(args, train: bool = True) -> LatentDataset:
    """The cache at --data_path, checked against the flags that must agree with how it was made."""
    dataset = LatentDataset(args.data_path, train)
    meta, where = dataset.meta, os.path.join(args.data_path, INDEX)
    expected = {"image_size": args.image_size, "use_video": bool(args.use_video), "vae": vae_id(args.vae)}
    if args.use_video:
        expected["num_frames"] = args.num_frames
        if "frame_interval" in meta:  # a hand-written index.json may lack it
            expected["frame_interval"] = args.frame_interval
    for key, value in expected.items():
        if meta.get(key) != value:
            raise UsageError(f"{where}: made with {key} {meta.get(key)}, but the flags give --{key} {value}")
    if dataset.has_labels and meta["max_label"] >= args.num_classes:
        raise UsageError(f"{where}: labels go up to {meta['max_label']}, outside [0, --num_classes {args.num_classes})")
    if dataset.has_text and getattr(args, "captions", "auto") != "off" and meta["text_encoder"] != source_id(args.text_encoder):
        raise UsageError(f"{where}: captions were encoded with {meta['text_encoder']}, but --text_encoder is {args.text_encoder}")
    return dataset
