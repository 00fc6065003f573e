"""Train a DiT or VDiT: `python train.py ...` on one process or `torchrun --nproc_per_node N train.py ...` with DDP."""
import argparse
import json
import math
import os
import random
import sys
import time
from collections import OrderedDict
from copy import deepcopy
from functools import partial
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

from opendit.builders import UsageError, build_model, check_model_flags, load_vae, model_config
from opendit.diffusion import create_diffusion
from opendit.parallelize import parallelize
from opendit.utils.checkpoint import (
    CheckpointError,
    experiment_dir_of,
    load_training_state,
    resolve_checkpoint_dir,
    save_checkpoint,
    set_rng_state,
)
from opendit.utils.distributed import all_reduce_mean, barrier, cleanup, setup_distributed
from opendit.utils.logging import create_logger

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # OpenDiT's flags, same names and defaults.
    parser.add_argument("--model", type=str, default="DiT-XL/2", help="registry name, e.g. DiT-XL/2 or VDiT-XL/1x2x2")
    parser.add_argument("--vae", type=str, default="ema", help="ema | mse (Stable Diffusion VAEs) | none (pixel space) | a local path or hub id")
    parser.add_argument("--use_video", action="store_true", help="train a video model (VDiT) on clips")
    parser.add_argument("--plugin", type=str, default="zero2", help="zero2 | ddp (zero2 over one process is plain training)")
    parser.add_argument("--outputs", type=str, default="./outputs", help="parent folder of the experiment folders")
    parser.add_argument("--load", type=str, default=None, help="resume from a checkpoint folder or an experiment folder (its latest checkpoint)")
    parser.add_argument("--num_frames", type=int, default=16, help="frames per clip (video)")
    parser.add_argument("--frame_interval", type=int, default=1, help="temporal stride between sampled frames (video)")
    parser.add_argument("--text_encoder", type=str, default="openai/clip-vit-base-patch32", help="text encoder for prompts")
    parser.add_argument("--data_path", type=str, default="./datasets", help="dataset location; when it does not exist the built-in shapes data is used")
    parser.add_argument("--image_size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--num_classes", type=int, default=1000, help="size of the class-label table")
    parser.add_argument("--epochs", type=int, default=1400)
    parser.add_argument("--batch_size", type=int, default=2, help="per data-parallel rank")
    parser.add_argument("--global_seed", type=int, default=42, help="rank r seeds with global_seed * world_size + r")
    parser.add_argument("--num_workers", type=int, default=4, help="DataLoader worker processes")
    parser.add_argument("--log_every", type=int, default=10, help="log loss and speed every N steps")
    parser.add_argument("--ckpt_every", type=int, default=1000, help="checkpoint every N steps (<= 0: only at the end)")
    parser.add_argument("--mixed_precision", type=str, default="bf16", choices=list(PRECISIONS), help="autocast dtype; weights, optimizer and EMA stay fp32")
    parser.add_argument("--grad_clip", type=float, default=1.0, help="max global gradient norm (<= 0 disables)")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    parser.add_argument("--grad_checkpoint", action="store_true", help="activation checkpointing per transformer block")
    parser.add_argument("--enable_modulate_kernel", action="store_true", help="Triton fused LayerNorm + modulate (adaLN) in every block and the final layer")
    parser.add_argument("--enable_layernorm_kernel", action="store_true", help="same fused kernel (our LayerNorm is fused with the modulation)")
    parser.add_argument("--enable_flashattn", action="store_true", help="attention on the fused GPU kernels only (cuDNN/flash; bf16/fp16)")
    parser.add_argument("--sequence_parallel_size", type=int, default=1, help="sequence-parallel group size")
    parser.add_argument("--sequence_parallel_type", type=str, default=None, help="fastseq (longseq) | ulysses")
    # Additions.
    parser.add_argument("--dataset", type=str, default="auto", choices=["auto", "shapes"], help="auto: --data_path if it exists, else the built-in shapes")
    parser.add_argument("--dataset_size", type=int, default=10000, help="items per epoch of the built-in shapes data")
    parser.add_argument("--max_steps", type=int, default=None, help="stop after this many optimizer steps (default: run all epochs)")
    parser.add_argument("--depth", type=int, default=None, help="override the registry model's depth (small experiments)")
    parser.add_argument("--hidden_size", type=int, default=None, help="override the registry model's hidden size")
    parser.add_argument("--num_heads", type=int, default=None, help="override the registry model's number of heads")
    parser.add_argument("--noise_schedule", type=str, default="linear", choices=["linear", "squaredcos_cap_v2"], help="beta schedule (DiT: linear)")
    parser.add_argument("--lr_schedule", type=str, default="constant", choices=["constant", "cosine"], help="constant (DiT) or cosine decay to 0 at the last step")
    parser.add_argument("--lr_warmup_steps", type=int, default=0, help="linear learning-rate warmup steps")
    parser.add_argument("--ema_decay", type=float, default=0.9999)
    parser.add_argument("--weight_decay", type=float, default=0.0)
    parser.add_argument("--device", type=str, default="auto", choices=["auto", "cpu", "cuda"])
    return parser


def check_flags(args: argparse.Namespace, world_size: int) -> None:
    """Refuse, in one line, flags whose feature is not in this version or that contradict each other."""
    not_yet = [
        (args.sequence_parallel_size > 1, "--sequence_parallel_size > 1"),
        (args.plugin in ("zero2", "zero3") and world_size > 1, f"--plugin {args.plugin} on several processes (use --plugin ddp)"),
    ]
    for used, flag in not_yet:
        if used:
            raise UsageError(f"{flag} is not available yet in this version of OpenDiT")
    if args.plugin not in ("zero2", "zero3", "ddp"):
        raise UsageError(f"--plugin {args.plugin}: choose zero2, zero3 or ddp")
    if args.sequence_parallel_type not in (None, "fastseq", "longseq", "ulysses"):
        raise UsageError(f"--sequence_parallel_type {args.sequence_parallel_type}: choose fastseq (longseq) or ulysses")
    for flag in ("batch_size", "epochs", "num_frames", "frame_interval", "log_every", "dataset_size"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} {getattr(args, flag)}: must be at least 1")
    if args.num_classes < 1:
        raise UsageError(f"--num_classes {args.num_classes}: must be at least 1")
    if args.lr_warmup_steps < 0:
        raise UsageError(f"--lr_warmup_steps {args.lr_warmup_steps}: must be at least 0")
    if args.max_steps is not None and args.max_steps < 1:
        raise UsageError(f"--max_steps {args.max_steps}: must be at least 1")
    if args.enable_flashattn and (args.mixed_precision == "fp32" or args.device == "cpu" or not torch.cuda.is_available()):
        raise UsageError("--enable_flashattn needs a CUDA GPU and --mixed_precision bf16 or fp16")
    if args.mixed_precision == "fp16" and args.device == "cpu":
        raise UsageError("--mixed_precision fp16 needs a GPU; use bf16 or fp32 on the CPU")
    check_model_flags(args.model, args.image_size, args.vae, args.use_video)


def build_dataset(args: argparse.Namespace):
    """The training set: the built-in shapes (images or clips) unless real data is given."""
    from opendit.data.shapes import SHAPE_CLASSES, ShapesDataset, ShapesVideoDataset

    if args.dataset == "auto" and os.path.exists(args.data_path):
        raise UsageError(f"--data_path {args.data_path}: real datasets are not available yet in this version; use --dataset shapes")
    num_classes = min(args.num_classes, len(SHAPE_CLASSES))
    try:
        if args.use_video:
            return ShapesVideoDataset(image_size=args.image_size, num_frames=args.num_frames, num_classes=num_classes, length=args.dataset_size, seed=0)
        return ShapesDataset(image_size=args.image_size, num_classes=num_classes, length=args.dataset_size, seed=0)
    except ValueError as e:
        raise UsageError(f"--dataset shapes (--image_size {args.image_size}, --num_classes {args.num_classes}): {e}") from None


class ResumableSampler(DistributedSampler):
    """A DistributedSampler that can skip the items this rank already consumed in the current epoch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.start_index = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.start_index :])

    def __len__(self) -> int:
        return self.num_samples - self.start_index


@torch.no_grad()
def update_ema(ema_model: torch.nn.Module, model: torch.nn.Module, decay: float = 0.9999) -> None:
    """ema = decay * ema + (1 - decay) * param, for every trainable parameter."""
    ema_params = OrderedDict(ema_model.named_parameters())
    for name, param in model.named_parameters():
        if param.requires_grad:
            ema_params[name].mul_(decay).add_(param.data, alpha=1 - decay)


def lr_factor(schedule: str, warmup_steps: int, max_steps: int, step: int) -> float:
    """Multiplier of --lr at a step: linear warmup, then constant or cosine decay to 0 at max_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def new_experiment_dir(outputs: str, model: str) -> str:
    """{outputs}/{NNN}-{model with '/' -> '-'}, NNN = number of entries already there."""
    os.makedirs(outputs, exist_ok=True)
    index = len(os.listdir(outputs))
    while True:
        path = os.path.join(outputs, f"{index:03d}-{model.replace('/', '-')}")
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            index += 1


def broadcast_str(value: Optional[str]) -> str:
    if dist.is_initialized():
        box = [value]
        dist.broadcast_object_list(box, src=0)
        value = box[0]
    return value


class MetricsWriter:
    """metrics.jsonl (always) and TensorBoard scalars (when tensorboard is installed), rank 0 only."""

    def __init__(self, experiment_dir: str, enabled: bool):
        self.enabled = enabled
        self.tb = None
        if enabled:
            self.file = open(os.path.join(experiment_dir, "metrics.jsonl"), "a")
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(experiment_dir, "tensorboard"))
            except Exception:  # tensorboard is optional
                self.tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def train(args: argparse.Namespace) -> None:
    info = setup_distributed(args.device)
    device = info.device
    check_flags(args, info.world_size)
    seed = args.global_seed * info.world_size + info.rank  # data-parallel ranks draw different t and noise
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_flush_denormal(True)  # CPU: denormal floats (from zero-initialised layers) are ~10x slower

    # Everything that can fail on user input comes before the experiment folder is made:
    resume_dir = resolve_checkpoint_dir(args.load) if args.load else None
    dataset = build_dataset(args)
    vae = load_vae(args.vae, device)
    config = model_config(args, vae)
    model = build_model(config).to(device)

    if resume_dir:
        experiment_dir = experiment_dir_of(resume_dir)
    else:
        experiment_dir = broadcast_str(new_experiment_dir(args.outputs, args.model) if info.is_main else None)
    checkpoint_dir = os.path.join(experiment_dir, "checkpoints")
    if info.is_main:
        os.makedirs(checkpoint_dir, exist_ok=True)
    barrier()
    logger = create_logger(experiment_dir, info.is_main)
    logger.info(f"Experiment folder: {experiment_dir}  (world size {info.world_size}, device {device})")

    if args.dataset == "auto":
        logger.info(f"--data_path {args.data_path} does not exist: training on the built-in shapes data")

    # EMA, diffusion, optimizer:
    ema = deepcopy(model).to(device).requires_grad_(False)  # fp32 exponential moving average of the weights
    ema.eval()
    parallelize(model, fused_adaln=args.enable_modulate_kernel or args.enable_layernorm_kernel, flash_attention=args.enable_flashattn, grad_checkpoint=args.grad_checkpoint)
    diffusion = create_diffusion(timestep_respacing="", noise_schedule=args.noise_schedule)  # 1000 steps, learned-range sigma
    logger.info(f"{args.model} parameters: {sum(p.numel() for p in model.parameters()):,}  config: {config}")
    if info.is_main:
        with open(os.path.join(experiment_dir, "config.json"), "w") as f:
            json.dump({"args": vars(args), "model": config}, f, indent=2)

    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay, fused=device.type == "cuda")
    amp_dtype = PRECISIONS[args.mixed_precision]
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    # Data:
    sampler = ResumableSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=args.global_seed, drop_last=True)
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=args.num_workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(seed),  # keeps the global RNG untouched, so resume is exact
    )
    steps_per_epoch = len(sampler) // args.batch_size
    if steps_per_epoch == 0:
        raise UsageError(f"--batch_size {args.batch_size}: larger than the {len(sampler)} items each rank gets per epoch")
    logger.info(f"Dataset: {type(dataset).__name__} with {len(dataset):,} items, {steps_per_epoch} steps per epoch")

    max_steps = args.max_steps or args.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, partial(lr_factor, args.lr_schedule, args.lr_warmup_steps, max_steps))

    # Resume or start:
    train_steps, start_epoch, epoch_step = 0, 0, 0
    if resume_dir:
        state = load_training_state(resume_dir, info.rank)
        if state.get("config", {}).get("model") != config:
            raise UsageError(f"--load {args.load}: checkpoint model {state.get('config', {}).get('model')} differs from the flags' {config}")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        scaler.load_state_dict(state["scaler"])
        scheduler.load_state_dict(state["scheduler"])
        train_steps, start_epoch, epoch_step = state["step"], state["epoch"], state["epoch_step"]
        if state["world_size"] != info.world_size or state["rng"] is None:
            logger.info(f"Resuming on {info.world_size} processes from a run on {state['world_size']}: data order and RNG restart")
            epoch_step = 0
        else:
            set_rng_state(state["rng"])
        logger.info(f"Resumed from {resume_dir} at step {train_steps} (epoch {start_epoch}, step {epoch_step} of it)")
    else:
        update_ema(ema, model, decay=0)  # the EMA starts equal to the model
    raw_model = model
    if info.world_size > 1:
        model = DDP(model, device_ids=[info.local_rank] if device.type == "cuda" else None)
    model.train()  # enables label dropout for classifier-free guidance

    if train_steps >= max_steps:
        logger.info(f"Nothing to do: step {train_steps} >= {max_steps}")
    metrics = MetricsWriter(experiment_dir, info.is_main)

    def checkpoint(epoch: int, step_in_epoch: int) -> None:
        state = {
            "model": raw_model.state_dict(),
            "ema": ema.state_dict(),
            "opt": opt.state_dict(),
            "scaler": scaler.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": train_steps,
            "epoch": epoch,
            "epoch_step": step_in_epoch,
            "world_size": info.world_size,
            "config": {"model": config, "args": vars(args)},
        }
        path = save_checkpoint(checkpoint_dir, f"step-{train_steps:07d}", state, info.rank, info.is_main)
        logger.info(f"Saved checkpoint to {path}")

    from tqdm import tqdm

    progress = tqdm(total=max_steps, initial=train_steps, disable=not info.is_main or None, desc="train", dynamic_ncols=True)
    running = torch.zeros(3, device=device)  # loss, mse, vb sums since the last log
    log_steps, last_saved, start_time = 0, -1, time.time()
    epoch = start_epoch
    while train_steps < max_steps and epoch < args.epochs:
        sampler.set_epoch(epoch)
        sampler.start_index = epoch_step * args.batch_size
        for batch in loader:
            x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
            with torch.no_grad():
                x = vae.encode(x)  # map to latent space, scaled by the VAE's factor
            t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
                loss_dict = diffusion.training_losses(model, x, t, dict(y=y))
            loss = loss_dict["loss"].mean()
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip if args.grad_clip > 0 else math.inf)
            scaler.step(opt)
            scaler.update()
            lr = scheduler.get_last_lr()[0]  # the rate this step used
            scheduler.step()
            update_ema(ema, raw_model, args.ema_decay)

            train_steps += 1
            epoch_step += 1
            log_steps += 1
            running += torch.stack([loss.detach(), loss_dict["mse"].mean().detach(), loss_dict.get("vb", torch.zeros_like(t, dtype=torch.float)).mean().detach()])
            progress.update(1)
            if train_steps % args.log_every == 0 or train_steps == max_steps:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.time() - start_time
                avg = all_reduce_mean(running / log_steps).tolist()
                record = {
                    "step": train_steps,
                    "epoch": epoch,
                    "loss": avg[0],
                    "mse": avg[1],
                    "vb": avg[2],
                    "grad_norm": float(grad_norm),
                    "steps_per_sec": log_steps / elapsed,
                    "images_per_sec": log_steps * args.batch_size * info.world_size / elapsed,
                    "lr": lr,
                }
                if device.type == "cuda":
                    record["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
                logger.info(
                    f"(step={train_steps:07d}) loss: {avg[0]:.4f}, steps/s: {record['steps_per_sec']:.2f}, images/s: {record['images_per_sec']:.1f}"
                )
                progress.set_postfix(loss=f"{avg[0]:.4f}")
                metrics.write(record)
                running.zero_()
                log_steps, start_time = 0, time.time()
            if args.ckpt_every > 0 and train_steps % args.ckpt_every == 0:
                checkpoint(epoch, epoch_step)
                last_saved = train_steps
            if train_steps >= max_steps:
                break
        else:
            epoch += 1
            epoch_step = 0
            continue
        break
    if last_saved != train_steps:
        checkpoint(epoch, epoch_step)
    progress.close()
    metrics.close()
    logger.info("Done!")
    cleanup()


def main(argv: Optional[list] = None) -> None:
    args = get_parser().parse_args(argv)
    try:
        train(args)
    except (UsageError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        cleanup()
        sys.exit(2)


if __name__ == "__main__":
    main()
