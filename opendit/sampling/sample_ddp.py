"""DiT's FID sampler: N class-conditional samples spread over the ranks, as PNGs plus the .npz the ADM suite reads.

    torchrun --nproc_per_node 8 sample_ddp.py --ckpt CKPT --num_fid_samples 50000 [--cfg_scale 1.5]

Writes {sample_dir}/{model}-{ckpt}-size-{S}-vae-{V}-cfg-{C}-seed-{G}/NNNNNN.png and, next to that folder, the same
name + .npz with arr_0 = uint8 (N, H, W, 3). Batch b of rank r holds the samples ((b * world + r) * n ...) and draws
its labels and noise from the seed (global_seed, first index): every sample has its own seeds, different on every
rank, and a rerun skips the batches whose PNGs all exist (resumable, also on another number of ranks). settings.json
in the folder records what decides the pixels (a digest of the weights, the sampler's and model's flags): a rerun
with other settings is refused rather than mixed with the samples already there.
"""
import argparse
import hashlib
import json
import math
import os
import re
from typing import Optional

import numpy as np
import torch
from PIL import Image

from opendit.builders import check_model_flags, model_config
from opendit.checkpoint.weights import load_model_weights
from opendit.encoders import load_vae
from opendit.errors import UsageError, run_or_exit
from opendit.parallel.process import barrier, cleanup, setup_distributed
from opendit.sampling.denoise import SAMPLERS, denoise
from opendit.sampling.sample import (
    MODEL_DEFAULTS,
    add_speed_flags,
    build_sampling_model,
    check_sampling_flags,
    resolve_model_flags,
    resolve_speed_flags,
    speed_up,
)
from opendit.utils.cli import USAGE, HelpFormatter, plural
from opendit.utils.media import atomic_path, save_image

SETTINGS = "settings.json"  # in the sample folder: what made its PNGs (run_settings)
SAMPLE_FILE = re.compile(r"\d{6}\.png")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, usage=USAGE)
    # DiT's sample_ddp.py flags (its hyphenated spellings work too); model flags default to the checkpoint's config.
    parser.add_argument("--ckpt", type=str, required=True, help="training checkpoint / experiment / export folder, .safetensors, or an official DiT .pt")
    parser.add_argument("--model", type=str, default=None, help=f"registry name (default: from the checkpoint, else {MODEL_DEFAULTS['model']})")
    parser.add_argument("--vae", type=str, default=None, help="ema | mse | none | PATH (default: from the checkpoint, else ema)")
    parser.add_argument("--image_size", "--image-size", type=int, default=None, help="image side in pixels (default: from the checkpoint, else 256)")
    parser.add_argument("--num_classes", "--num-classes", type=int, default=None, help="class-table size (default: from the checkpoint, else 1000)")
    parser.add_argument("--noise_schedule", type=str, default=None, choices=["linear", "squaredcos_cap_v2"], help="beta schedule (default: from the checkpoint, else linear)")
    parser.add_argument("--sample_dir", "--sample-dir", type=str, default="samples", help="the sample folder and its .npz go here")
    parser.add_argument("--per_proc_batch_size", "--per-proc-batch-size", type=int, default=32, help="samples per forward pass on each rank")
    parser.add_argument("--num_fid_samples", "--num-fid-samples", type=int, default=50_000, help="samples in all, over every rank")
    parser.add_argument("--cfg_scale", "--cfg-scale", type=float, default=1.5, help="classifier-free guidance (<= 1: off)")
    parser.add_argument("--cfg_channels", type=str, default="3", choices=["3", "all"], help="channels guided: 3 as in DiT's published numbers, or all")
    parser.add_argument("--num_sampling_steps", "--num-sampling-steps", type=int, default=250, help="denoising steps")
    parser.add_argument("--sampler", type=str, default="ddpm", choices=SAMPLERS, help="ddpm, ddim (eta 0) or dpm-solver (DPM-Solver++ 2M)")
    parser.add_argument("--global_seed", "--global-seed", type=int, default=0, help="each batch's labels and noise come from (this, its first sample index)")
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True, help="TF32 matmuls (DiT: on)")
    parser.add_argument("--use_model", action="store_true", help="the raw model weights instead of the EMA (training checkpoints)")
    parser.add_argument("--device", type=str, default="auto", choices=["auto", "cpu", "cuda"], help="where to sample (auto: a GPU when there is one)")
    add_speed_flags(parser, ddp=True)
    return parser


def folder_name(args: argparse.Namespace) -> str:
    """DiT's sample folder name: {model}-{ckpt}-size-{S}-vae-{V}-cfg-{C}-seed-{G}."""
    ckpt = os.path.basename(os.path.normpath(args.ckpt)).replace(".pt", "").replace(".safetensors", "")
    return f"{args.model.replace('/', '-')}-{ckpt}-size-{args.image_size}-vae-{args.vae}-cfg-{args.cfg_scale}-seed-{args.global_seed}"


def batch_seed(global_seed: int, first_index: int) -> int:
    """One seed per batch, from its first sample index: independent of the number of ranks."""
    return global_seed * 1_000_003 + first_index


def weights_digest(state_dict: dict) -> str:
    """sha256 of every tensor's name, dtype, shape and bytes: which weights made a sample folder's PNGs."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name} {t.dtype} {list(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def run_settings(args: argparse.Namespace, state_dict: dict) -> dict:
    """What decides each sample's pixels, as settings.json records it (the path is for the reader; the digest is compared)."""
    keys = ("use_model", "model", "image_size", "num_classes", "vae", "noise_schedule", "sampler", "num_sampling_steps", "cfg_scale", "cfg_channels",
            "global_seed", "per_proc_batch_size", "mixed_precision", "tf32", "float8", "bf16_residual")
    return {**{key: getattr(args, key) for key in keys}, "ckpt": os.path.realpath(args.ckpt), "weights": weights_digest(state_dict)}


def as_flag(key: str, value) -> str:
    """A recorded setting as the flag that gives it: --sampler ddim, --use_model, no --tf32."""
    return (f"--{key}" if value else f"no --{key}") if isinstance(value, bool) else f"--{key} {value}"


def check_resume(folder: str, settings: dict) -> list:
    """A one-line error when folder holds PNGs made with other settings (or with none recorded). -> the indices of its PNGs"""
    found = sorted(int(n[:6]) for n in os.listdir(folder) if SAMPLE_FILE.fullmatch(n)) if os.path.isdir(folder) else []
    path = os.path.join(folder, SETTINGS)
    if found and not os.path.isfile(path):
        raise UsageError(f"{folder}: holds {plural(len(found), 'sample')} but no {SETTINGS} recording how they were made; move them away or choose another --sample_dir")
    if not found:
        return found
    try:
        with open(path) as f:
            saved = json.load(f)
    except ValueError:
        raise UsageError(f"{path}: not readable as JSON, so its {plural(len(found), 'sample')} cannot be matched to this run; move them away or choose another --sample_dir") from None
    for key, value in settings.items():
        if key != "ckpt" and saved.get(key) != value:
            then = f"the weights of {saved.get('ckpt')} (digest {saved.get(key)})" if key == "weights" else as_flag(key, saved.get(key))
            now = f"--ckpt {settings['ckpt']} holds other weights (digest {value})" if key == "weights" else f"this run has {as_flag(key, value)}"
            raise UsageError(f"{folder}: its {plural(len(found), 'sample')} were made with {then}, {now}; "
                             "rerun with the same settings to resume, or choose another --sample_dir")
    return found


def write_settings(folder: str, settings: dict) -> None:
    """settings.json, written whole (a reader never sees half of it)."""
    with atomic_path(os.path.join(folder, SETTINGS)) as tmp, open(tmp, "w") as f:
        f.write(json.dumps(settings, indent=2) + "\n")


def write_npz(folder: str, num_samples: int) -> str:
    """Pack NNNNNN.png, 0 <= N < num_samples, into {folder}.npz (arr_0: uint8 NHWC), as ADM's evaluator reads."""
    images = np.stack([np.asarray(Image.open(os.path.join(folder, f"{i:06d}.png")).convert("RGB")) for i in range(num_samples)])
    path = f"{folder}.npz"
    np.savez(path, arr_0=images)
    return path


@torch.no_grad()
def sample_ddp(args: argparse.Namespace) -> dict:
    check_sampling_flags(args)
    info = setup_distributed(args.device)
    state_dict, train_config = load_model_weights(args.ckpt, use_ema=not args.use_model)
    args.num_frames, args.use_video = None, False
    resolve_model_flags(args, train_config)
    if args.use_video or "text_embedder.weight" in state_dict:
        raise UsageError(f"--ckpt {args.ckpt}: sample_ddp.py samples class-conditional image models only")
    check_model_flags(args.model, args.image_size, args.vae, args.use_video)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.set_flush_denormal(True)
    resolve_speed_flags(args, info.device)
    folder = os.path.join(args.sample_dir, folder_name(args))
    settings = json.loads(json.dumps(run_settings(args, state_dict)))  # as read back from the file
    reused = len([i for i in check_resume(folder, settings) if i < args.num_fid_samples])  # every rank, before any rank writes
    vae = load_vae(args.vae, info.device)
    config = model_config(args, vae)
    model = speed_up(args, build_sampling_model(args, config, state_dict, info.device, has_config=train_config is not None))
    barrier()
    if info.is_main:
        os.makedirs(folder, exist_ok=True)
        write_settings(folder, settings)
    barrier()
    n, world = args.per_proc_batch_size, info.world_size
    latent_shape = (config["in_channels"], config["input_size"], config["input_size"])
    written = []
    for b in range(math.ceil(args.num_fid_samples / (n * world))):
        first = (b * world + info.rank) * n
        indices = [i for i in range(first, first + n) if i < args.num_fid_samples]
        paths = [os.path.join(folder, f"{i:06d}.png") for i in indices]
        if all(os.path.exists(p) for p in paths):  # nothing left in this batch (or beyond N): resumed / done
            continue
        torch.manual_seed(batch_seed(args.global_seed, first))  # also drives the sampler's own noise
        z = torch.randn(n, *latent_shape, device=info.device)
        y = torch.randint(0, args.num_classes, (n,), device=info.device)
        images = vae.decode(denoise(args, model, z, y)).clamp(-1, 1).cpu()
        for x, path in zip(images, paths):
            if not os.path.exists(path):
                written.append(save_image(x, path))
    barrier()
    npz = write_npz(folder, args.num_fid_samples) if info.is_main else None
    if npz:
        new = args.num_fid_samples - reused
        print(f"Saved {plural(args.num_fid_samples, 'sample')} ({new} new, {reused} reused) to {folder} and {npz}")
    barrier()
    cleanup()
    return {"folder": folder, "written": written, "npz": f"{folder}.npz"}


def main(argv: Optional[list] = None) -> dict:
    return run_or_exit(sample_ddp, get_parser().parse_args(argv))


if __name__ == "__main__":
    main()
