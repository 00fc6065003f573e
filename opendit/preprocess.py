"""Prepare data for train.py: a UCF101 tree or any media folder -> an OpenDiT CSV; any dataset -> a latent cache.

  python preprocess.py ucf101 --root UCF-101 --split ucfTrainTestlist/trainlist01.txt --output preprocess/ucf101_train.csv
  python preprocess.py folder --root my_videos --output my_videos/data.csv
  python preprocess.py latents --data_path preprocess/ucf101_train.csv --use_video --output cache/ucf101 --vae ema
  torchrun --nproc_per_node 8 preprocess.py latents ...   # each rank writes its own shards

A latent run is resumable: shards already written with the same settings are skipped, each shard is written to a temp
file and renamed, and index.json (which train.py looks for) is written last.
"""

import argparse
import csv
import json
import math
import os
import re
import sys
from typing import Optional

import torch
from torch.utils.data import DataLoader

from opendit.data.build import KINDS, build_dataset, infer_kind, text_encoder_for
from opendit.data.latents import FORMAT, INDEX, shard_name, source_id, vae_id
from opendit.data.table import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from opendit.encoders import load_vae
from opendit.errors import UsageError
from opendit.parallel.process import barrier, cleanup, setup_distributed
from opendit.utils.cli import HelpFormatter, file_in_path, output_folder_problem
from opendit.utils.logging import create_logger
from opendit.utils.media import atomic_path

STORE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def class_words(name: str) -> str:
    """A class folder name as words: BoxingPunchingBag -> Boxing Punching Bag, YoYo -> Yo Yo, apply_eye -> apply eye."""
    name = re.sub(r"[_\-]+", " ", name)
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", name).strip()


def list_media(root: str, extensions: tuple) -> list:
    """Media files under root, as sorted paths relative to it."""
    found = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.relpath(os.path.join(folder, f), root) for f in files if f.lower().endswith(extensions)]
    return sorted(found)


def read_split(path: str, root: str) -> list:
    """An official UCF101 split list (`Class/v_x.avi [label]` lines) -> relative paths of the listed files."""
    if not os.path.isfile(path):
        raise UsageError(f"--split {path}: no such file")
    with open(path) as f:
        listed = [line.split()[0].replace("/", os.sep) for line in f if line.strip()]
    if not listed:
        raise UsageError(f"--split {path}: no entries")
    return listed


def read_class_index(split: Optional[str]) -> Optional[list]:
    """classInd.txt (`1 ApplyEyeMakeup` lines) beside a split list -> class names in label order, else None."""
    path = os.path.join(os.path.dirname(split), "classInd.txt") if split else ""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        pairs = sorted((int(line.split()[0]), line.split()[1]) for line in f if line.strip())
    return [name for _, name in pairs]


def media_rows(root: str, files: list, classes: Optional[list] = None) -> list:
    """(path, caption, label) per file. Files in class sub-folders get the folder's words as caption and its index as
    label; a `name.txt` beside a file gives its caption instead; files at the top level are captioned by their name."""
    labelled = all(os.sep in f for f in files)
    loose = [f for f in files if os.sep not in f]
    if loose and len(loose) < len(files):
        print(f"warning: {len(loose)} file(s) lie at the top of {root} beside class folders (the first: {loose[0]}): no class labels are "
              "written and every file is captioned by its name; move them into a class folder to label by folder", file=sys.stderr)
    if labelled and not classes:
        classes = sorted({f.split(os.sep)[0] for f in files})
    rows = []
    for f in files:
        sidecar = os.path.join(root, os.path.splitext(f)[0] + ".txt")
        top = f.split(os.sep)[0]
        if os.path.isfile(sidecar):
            with open(sidecar) as s:
                caption = " ".join(s.read().split())
        else:
            caption = class_words(top) if labelled else class_words(os.path.splitext(os.path.basename(f))[0])
        if labelled and top not in classes:
            raise UsageError(f"{os.path.join(root, f)}: class {top} is not in the class list")
        rows.append((os.path.join(root, f), caption, classes.index(top) if labelled else None))
    return rows


def write_csv(rows: list, output: str) -> None:
    """path,caption[,label] with a header; paths relative to the CSV when the files lie under its folder."""
    folder = os.path.dirname(os.path.abspath(output))
    labelled = rows[0][2] is not None
    with atomic_path(output) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "caption", "label"] if labelled else ["path", "caption"])
        for path, caption, label in rows:
            path = os.path.abspath(path)
            if path.startswith(folder + os.sep):
                path = os.path.relpath(path, folder)
            writer.writerow([path, caption, label] if labelled else [path, caption])


def check_output_file(output: str, overwrite: bool) -> None:
    """--output must name a file this command may write: not a folder, not under a file, not an existing file unless --overwrite."""
    folder = os.path.dirname(os.path.abspath(output))
    if os.path.isdir(output):
        raise UsageError(f"--output {output}: is a folder; give the CSV file to write")
    if os.path.exists(output) and not overwrite:
        raise UsageError(f"--output {output}: already exists; add --overwrite to replace it, or choose another name")
    blocked = file_in_path(folder)
    if blocked:
        raise UsageError(f"--output {output}: {blocked} is a file, not a folder")


def to_csv(args: argparse.Namespace, extensions: tuple) -> None:
    """The ucf101 / folder subcommands."""
    check_output_file(args.output, args.overwrite)
    root, split = args.root, args.split
    if split and not os.path.isfile(split) and os.path.isdir(os.path.join(root, split)):
        root, split = os.path.join(root, split), None  # OpenDiT's layout: root/<split>/<Class>/<video>
    if os.path.isfile(root):
        raise UsageError(f"--root {root}: is a file; give the folder that holds the media")
    if not os.path.isdir(root):
        raise UsageError(f"--root {root}: no such folder")
    if split and not os.path.isfile(split):
        raise UsageError(f"--split {split}: neither a split list file nor a folder {os.path.join(root, split)}")
    files = read_split(split, root) if split else list_media(root, extensions)
    present = [f for f in files if os.path.isfile(os.path.join(root, f))]
    if not present:
        raise UsageError(f"--root {root}: no media files found" + (f" from --split {split}" if split else ""))
    classes = read_class_index(split)
    if not classes:  # the class folders of the whole tree (already listed when there is no split)
        tree = list_media(root, extensions) if split else files
        classes = sorted({f.split(os.sep)[0] for f in tree if os.sep in f}) or None
    rows = media_rows(root, present, classes)
    write_csv(rows, args.output)
    absent = sorted(set(files) - set(present))
    missing = f"; {len(absent)} listed files are missing (the first: {os.path.join(root, absent[0])})" if absent else ""
    print(f"Wrote {len(rows)} rows to {args.output}{missing}")


def posterior(vae, x: torch.Tensor) -> tuple:
    """Scaled posterior (mean, std) of vae.encode(x): mean + std * noise is the sample vae.encode draws."""
    if vae.is_identity:
        return x, None
    mean, std = vae.posterior(x)
    return (mean - vae.shift_factor) * vae.scaling_factor, std * vae.scaling_factor


def encode_items(items: list, vae, text_encoder, device, dtype: torch.dtype) -> dict:
    """Good items of one batch -> the shard tensors (both flips of the posterior, labels, caption embeddings)."""
    x = torch.stack([item["x"] for item in items]).to(device)  # (B, 3, [T,] H, W)
    out = {}
    with torch.no_grad():
        for suffix, pixels in (("", x), ("_flip", x.flip(-1))):
            mean, std = posterior(vae, pixels)
            out["mean" + suffix] = mean.to("cpu", dtype)
            if std is not None:
                out["std" + suffix] = std.to("cpu", dtype)
        if text_encoder is not None:
            out["text_emb"] = text_encoder.encode([item["text"] for item in items]).float().cpu()  # (B, D)
    if "y" in items[0]:
        out["y"] = torch.tensor([item["y"] for item in items], dtype=torch.int64)
    return out


def write_shard(path: str, parts: list, settings: dict, skipped: int) -> None:
    """Concatenate a shard's batches and save it atomically (temp file + os.replace)."""
    from safetensors.torch import save_file

    tensors = {key: torch.cat([p[key] for p in parts]).contiguous() for key in parts[0]} if parts else {}
    count = len(tensors["index"]) if tensors else 0
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"settings": json.dumps(settings, sort_keys=True), "count": str(count), "skipped": str(skipped)})


def shard_metadata(path: str) -> dict:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.metadata() or {}


def shard_done(path: str, settings: dict) -> bool:
    """True when the shard exists and was written with these settings (resume); an error when the settings differ."""
    if not os.path.isfile(path):
        return False
    try:
        previous = json.loads(shard_metadata(path)["settings"])
    except Exception:
        raise UsageError(f"{path}: not a readable shard; delete it to rewrite it") from None
    if previous != settings:
        changed = sorted(k for k in settings if previous.get(k) != settings[k])
        raise UsageError(f"{path}: written with other settings ({', '.join(changed)}); use another --output or delete it")
    return True


def write_index(args, settings: dict, num_shards: int, vae, text_encoder) -> dict:
    """index.json from the shards on disk (rank 0, after every rank finished)."""
    from safetensors import safe_open

    shards, max_label, latent_shape, skipped = [], -1, None, 0
    for k in range(num_shards):
        path = os.path.join(args.output, shard_name(k))
        if not os.path.isfile(path):
            raise UsageError(f"{path}: missing (did a rank fail?); run the same command again to finish")
        with safe_open(path, framework="pt") as f:
            meta = f.metadata()
            if "y" in f.keys():
                max_label = max(max_label, int(f.get_tensor("y").max()))
            if "mean" in f.keys() and latent_shape is None:
                latent_shape = list(f.get_slice("mean").get_shape()[1:])
        shards.append({"file": shard_name(k), "count": int(meta["count"])})
        skipped += int(meta["skipped"])
    index = {
        "format": FORMAT,
        "version": 1,
        "count": sum(s["count"] for s in shards),
        "skipped": skipped,
        "shards": shards,
        "latent_shape": latent_shape,
        "stochastic": not vae.is_identity,
        "flips": True,
        "scaling_factor": vae.scaling_factor,
        "shift_factor": vae.shift_factor,
        "latent_channels": vae.latent_channels,
        "downsample": vae.downsample,
        "has_labels": max_label >= 0,
        "max_label": max_label,
        "num_classes": max_label + 1,
        "text_dim": text_encoder.dim if text_encoder is not None else 0,
        "null_text_emb": text_encoder.null_embedding()[0].float().cpu().tolist() if text_encoder is not None else None,
        **settings,
    }
    with atomic_path(os.path.join(args.output, INDEX)) as tmp, open(tmp, "w") as f:
        json.dump(index, f, indent=1)
    return index


def extract_latents(args: argparse.Namespace) -> None:
    """Encode every item once (both flips) into rank-sharded .safetensors files, then write index.json."""
    if args.dataset != "shapes" and not os.path.exists(args.data_path):
        raise UsageError(f"--data_path {args.data_path}: no such file or folder")
    info = setup_distributed(args.device)
    logger = create_logger(None, True)
    tag = f"[rank {info.rank}] " if info.world_size > 1 else ""
    dataset = build_dataset(args, train=False)
    if dataset.is_latent:
        raise UsageError(f"--data_path {args.data_path}: already a latent cache")
    vae = load_vae(args.vae, info.device)
    if args.image_size % vae.downsample:
        raise UsageError(f"--image_size {args.image_size}: not divisible by the VAE's downsampling {vae.downsample}")
    text_encoder = text_encoder_for(args, dataset, info.device)
    settings = {
        "source": os.path.abspath(args.data_path) if os.path.exists(args.data_path) else args.data_path,
        "dataset": infer_kind(args),
        "items": len(dataset),
        "image_size": args.image_size,
        "use_video": bool(args.use_video),
        "num_frames": args.num_frames if args.use_video else None,
        "frame_interval": args.frame_interval if args.use_video else None,
        "vae": vae_id(args.vae),
        "text_encoder": source_id(args.text_encoder) if text_encoder is not None else None,
        "dtype": args.dtype,
        "shard_size": args.shard_size,
    }
    problem = output_folder_problem("--output", args.output, "give the cache folder to write")
    if problem:
        raise UsageError(problem)
    os.makedirs(args.output, exist_ok=True)
    num_shards = math.ceil(len(dataset) / args.shard_size)
    mine = range(info.rank, num_shards, info.world_size)
    todo = [k for k in mine if not shard_done(os.path.join(args.output, shard_name(k)), settings)]
    logger.info(f"{tag}{len(dataset):,} items in {num_shards} shards; this rank writes {len(todo)} ({len(mine) - len(todo)} already done)")

    def bounds(k: int) -> range:
        return range(k * args.shard_size, min(len(dataset), (k + 1) * args.shard_size))

    batches = [list(bounds(k)[i : i + args.batch_size]) for k in todo for i in range(0, len(bounds(k)), args.batch_size)]
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=args.num_workers, collate_fn=list)
    parts, skipped = [], 0
    for indices, items in zip(batches, loader):
        good = [(i, item) for i, item in zip(indices, items) if item is not None]
        skipped += len(items) - len(good)
        if good:
            part = encode_items([item for _, item in good], vae, text_encoder, info.device, STORE_DTYPES[args.dtype])
            parts.append({**part, "index": torch.tensor([i for i, _ in good], dtype=torch.int64)})
        k = indices[0] // args.shard_size
        if indices[-1] == bounds(k)[-1]:  # the shard's last batch
            write_shard(os.path.join(args.output, shard_name(k)), parts, settings, skipped)
            logger.info(f"{tag}wrote {shard_name(k)} ({sum(len(p['index']) for p in parts)} items, {skipped} skipped)")
            parts, skipped = [], 0
    barrier()
    if info.is_main:
        index = write_index(args, settings, num_shards, vae, text_encoder)
        logger.info(f"Latent cache {args.output}: {index['count']:,} items of shape {index['latent_shape']}, {index['skipped']} skipped")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, what in (("ucf101", "a UCF101 tree (root/<Class>/<video>.avi) -> CSV path,caption,label"),
                       ("folder", "any folder of videos or images -> CSV path,caption[,label]")):
        sub = commands.add_parser(name, help=what, description=what, formatter_class=HelpFormatter)
        root_help = "the UCF101 folder (the one holding the class folders)" if name == "ucf101" else "the media folder (class sub-folders label the files)"
        sub.add_argument("--root", required=True, help=root_help)
        sub.add_argument("--split", default=None, help="an official split list (trainlist01.txt, testlist01.txt) or a sub-folder name (OpenDiT: train)")
        sub.add_argument("--output", required=True, help="the CSV to write")
        sub.add_argument("--overwrite", action="store_true", help="replace --output when it exists")
        if name == "folder":
            sub.add_argument("--images", action="store_true", help="list images instead of videos")
    sub = commands.add_parser("latents", help="encode a dataset once into a latent cache for train.py --dataset latents",
                              formatter_class=HelpFormatter)
    sub.add_argument("--data_path", required=True, help="what train.py would read: a CSV, an image folder, CIFAR-10's folder")
    sub.add_argument("--dataset", default="auto", choices=[k for k in KINDS if k != "latents"])
    sub.add_argument("--output", required=True, help="the cache folder (shards + index.json)")
    sub.add_argument("--vae", default="ema", help="as train.py's --vae; train with the same value")
    sub.add_argument("--image_size", type=int, default=256)
    sub.add_argument("--use_video", action="store_true", help="clips from a video CSV")
    sub.add_argument("--num_frames", type=int, default=16)
    sub.add_argument("--frame_interval", type=int, default=1)
    sub.add_argument("--num_classes", type=int, default=1000, help="labels must lie below it")
    sub.add_argument("--text_encoder", default="openai/clip-vit-base-patch32", help="encodes the captions (train with the same value)")
    sub.add_argument("--captions", default="auto", choices=["auto", "on", "off"], help="as train.py's --captions")
    sub.add_argument("--short_video", default="loop", choices=["loop", "skip"], help="as train.py's --short_video")
    sub.add_argument("--dataset_size", type=int, default=10000, help="items of the built-in shapes data")
    sub.add_argument("--batch_size", type=int, default=32, help="items encoded at once")
    sub.add_argument("--num_workers", type=int, default=4, help="DataLoader workers decoding the files")
    sub.add_argument("--shard_size", type=int, default=4096, help="items per shard file")
    sub.add_argument("--dtype", default="fp16", choices=list(STORE_DTYPES), help="storage precision of the latents")
    sub.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return parser


def main(argv: Optional[list] = None) -> None:
    args = get_parser().parse_args(argv)
    try:
        if args.command == "latents":
            for flag in ("image_size", "num_frames", "frame_interval", "batch_size", "shard_size", "num_classes"):
                if getattr(args, flag) < 1:
                    raise UsageError(f"--{flag} {getattr(args, flag)}: must be at least 1")
            extract_latents(args)
        else:
            to_csv(args, IMAGE_EXTENSIONS if getattr(args, "images", False) else VIDEO_EXTENSIONS)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        cleanup()
        sys.exit(2)
    cleanup()
