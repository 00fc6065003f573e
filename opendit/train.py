"""Train a DiT or VDiT: `python train.py ...` on one process, or `torchrun ... train.py --plugin zero2|zero3|ddp ...`."""
import argparse
import json
import math
import os
import random
import time
from functools import partial
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, DistributedSampler

from opendit.builders import UsageError, build_model, check_model_flags, load_vae, model_config, run_or_exit
from opendit.data import build_dataset, prepare_batch, text_encoder_for
from opendit.diffusion import create_diffusion
from opendit.distributed.checkpoint import load_checkpoint, read_train_state, save_checkpoint
from opendit.distributed.ema import ShardedEMA, local_shard
from opendit.distributed.optim import ShardedAdamW
from opendit.distributed.mesh import SP, dp_coordinate, sp_size
from opendit.parallel import broadcast_from_sp_leader, build_mesh
from opendit.parallelize import BLOCKS_PER_UNIT, PLUGINS, parallelize
from opendit.utils.checkpoint import experiment_dir_of, latest_checkpoint, resolve_checkpoint_dir, set_rng_state
from opendit.utils.distributed import all_reduce_mean, barrier, cleanup, setup_distributed
from opendit.utils.flops import train_flops_per_sample
from opendit.utils.logging import create_logger

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # OpenDiT's flags, same names and defaults.
    parser.add_argument("--model", type=str, default="DiT-XL/2", help="registry name, e.g. DiT-XL/2 or VDiT-XL/1x2x2")
    parser.add_argument("--vae", type=str, default="ema", help="ema | mse (Stable Diffusion VAEs) | none (pixel space) | a local path or hub id")
    parser.add_argument("--use_video", action="store_true", help="train a video model (VDiT) on clips")
    parser.add_argument("--plugin", type=str, default="zero2", help="zero2 | zero3 (FSDP2: sharded optimizer, gradients, EMA; zero3 also parameters) | ddp; one process trains unwrapped")
    parser.add_argument("--outputs", type=str, default="./outputs", help="parent folder of the experiment folders")
    parser.add_argument("--load", type=str, default=None, help="resume from a checkpoint folder or an experiment folder (its latest checkpoint); auto: --experiment_dir's latest, if any")
    parser.add_argument("--num_frames", type=int, default=16, help="frames per clip (video)")
    parser.add_argument("--frame_interval", type=int, default=1, help="temporal stride between sampled frames (video)")
    parser.add_argument("--text_encoder", type=str, default="openai/clip-vit-base-patch32", help="CLIP text encoder (hub id or folder) for captioned data; sample.py reuses it")
    parser.add_argument("--data_path", type=str, default="./datasets", help="dataset location; when it does not exist the built-in shapes data is used")
    parser.add_argument("--image_size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--num_classes", type=int, default=1000, help="size of the class-label table (unlabelled data: none is built)")
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
    parser.add_argument("--sequence_parallel_overlap", type=str, default="off", choices=["on", "off"], help="FastSeq: overlap the AllGather with the qkv GEMM through an async ring (measured slower on one NVLink host, see docs/benchmarks.md)")
    # Additions.
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
    # Data (opendit/data/build.py).
    parser.add_argument("--dataset", type=str, default="auto", choices=["auto", "shapes", "folder", "cifar10", "csv", "latents"], help="auto: shapes when --data_path does not exist, else inferred from it (a .csv, a latent cache, CIFAR-10's folder, a class folder)")
    parser.add_argument("--on_bad_sample", type=str, default="skip", choices=["skip", "error"], help="an unreadable image or video: replace it by another item and log the count, or stop")
    parser.add_argument("--short_video", type=str, default="loop", choices=["loop", "skip"], help="a video shorter than the clip: shrink the stride, then loop it; or skip it as a bad sample")
    parser.add_argument("--captions", type=str, default="auto", choices=["auto", "on", "off"], help="condition on captions with --text_encoder: auto (CSV data and captioned latent caches), on (shapes too), off")
    # Distributed engine.
    parser.add_argument("--experiment_dir", type=str, default=None, help="use this experiment folder instead of a new {outputs}/NNN-model (restart-safe with --load auto)")
    parser.add_argument("--ckpt_keep", type=int, default=3, help="keep the newest K checkpoints (<= 0: keep all)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    parser.add_argument("--fsdp_blocks_per_unit", type=int, default=BLOCKS_PER_UNIT, help="zero2/zero3: blocks gathered and reduced together (fewer units: less FSDP2 CPU time per step)")
    parser.add_argument("--peak_tflops", type=float, default=None, help="per-GPU peak for MFU (default: 989 for bf16/fp16 on H100/H200, else no MFU)")
    return parser


def restarted_by_torchrun() -> bool:
    """True in the workers torchrun started again after a failure (--max-restarts)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def check_flags(args: argparse.Namespace, world_size: int) -> None:
    """Refuse, in one line, flags whose feature is not in this version or that contradict each other."""
    if args.sequence_parallel_size < 1 or world_size % args.sequence_parallel_size:
        raise UsageError(f"--sequence_parallel_size {args.sequence_parallel_size}: must divide the {world_size} processes")
    if args.plugin not in PLUGINS:
        raise UsageError(f"--plugin {args.plugin}: choose zero2, zero3 or ddp")
    if args.load == "auto" and args.experiment_dir is None and not restarted_by_torchrun():
        raise UsageError("--load auto needs --experiment_dir (the folder whose latest checkpoint to resume)")
    if args.sequence_parallel_type not in (None, "fastseq", "longseq", "ulysses"):
        raise UsageError(f"--sequence_parallel_type {args.sequence_parallel_type}: choose fastseq (longseq) or ulysses")
    for flag in ("batch_size", "epochs", "num_frames", "frame_interval", "log_every", "dataset_size", "fsdp_blocks_per_unit"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} {getattr(args, flag)}: must be at least 1")
    if args.num_classes < 0:
        raise UsageError(f"--num_classes {args.num_classes}: must be at least 0 (0: no class labels)")
    if args.lr_warmup_steps < 0:
        raise UsageError(f"--lr_warmup_steps {args.lr_warmup_steps}: must be at least 0")
    if args.max_steps is not None and args.max_steps < 1:
        raise UsageError(f"--max_steps {args.max_steps}: must be at least 1")
    if args.enable_flashattn and (args.mixed_precision == "fp32" or args.device == "cpu" or not torch.cuda.is_available()):
        raise UsageError("--enable_flashattn needs a CUDA GPU and --mixed_precision bf16 or fp16")
    if args.mixed_precision == "fp16" and args.device == "cpu":
        raise UsageError("--mixed_precision fp16 needs a GPU; use bf16 or fp32 on the CPU")
    check_model_flags(args.model, args.image_size, args.vae, args.use_video)


class ResumableSampler(DistributedSampler):
    """A DistributedSampler (drop_last) that starts start_index items into the epoch's shuffled order, counted over
    all ranks: a resumed epoch continues exactly where it stopped, on the same or a different number of ranks."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.start_index = 0

    def __iter__(self):
        if self.shuffle:  # the same order as DistributedSampler's
            order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(len(self.dataset)))
        end = self.start_index + len(self) * self.num_replicas
        return iter(order[self.start_index + self.rank : end : self.num_replicas])

    def __len__(self) -> int:
        return max(0, (self.total_size - self.start_index) // self.num_replicas)


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


def run_experiment_dir(outputs: str) -> Optional[str]:
    """The experiment folder this torchrun job made before it was restarted (config.json records the run id)."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    for name in sorted(os.listdir(outputs)) if run_id and os.path.isdir(outputs) else []:
        try:
            with open(os.path.join(outputs, name, "config.json")) as f:
                if json.load(f).get("run_id") == run_id:
                    return os.path.join(outputs, name)
        except (OSError, ValueError):
            continue
    return None


def resume_dir_for(args: argparse.Namespace) -> Optional[str]:
    """The checkpoint to resume: --load's; with --load auto, or when torchrun restarted this job after a failure,
    the newest checkpoint of the run's experiment folder (none yet: start fresh)."""
    loaded = resolve_checkpoint_dir(args.load) if args.load not in (None, "auto") else None
    if args.load == "auto" or restarted_by_torchrun():
        experiment = args.experiment_dir or (experiment_dir_of(loaded) if loaded else None) or run_experiment_dir(args.outputs)
        return (latest_checkpoint(experiment) if experiment else None) or loaded
    if loaded is None and args.experiment_dir and latest_checkpoint(args.experiment_dir):
        raise UsageError(f"--experiment_dir {args.experiment_dir} already holds checkpoints: add --load auto to resume")
    return loaded


@torch.no_grad()
def clip_grad_norm(params: list, max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ that, for FSDP2 (DTensor) gradients, works on the local shards with one all-reduce of the
    squared norm (the DTensor path dispatches every tensor separately and cost tens of ms per step)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or not isinstance(grads[0], DTensor):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    local = [local_shard(g) for g in grads]
    total = torch.stack(torch._foreach_norm(local, 2.0)).square().sum()  # sum over this rank's shards of |g|^2
    dist.all_reduce(total, group=grads[0].device_mesh.get_group())
    total = total.sqrt()
    torch._foreach_mul_(local, torch.clamp(max_norm / (total + 1e-6), max=1.0))
    return total


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, params: list, grad_clip: float) -> tuple:
    """Unscale, clip and step; returns (gradient norm, skipped). An fp16 step whose gradients overflowed anywhere is
    skipped on every rank (the DTensor found-inf check is all-reduced) and the loss scale shrinks."""
    scaler.unscale_(optimizer)
    grad_norm = clip_grad_norm(params, grad_clip if grad_clip > 0 else math.inf)
    scale = scaler.get_scale() if scaler.is_enabled() else None
    scaler.step(optimizer)
    scaler.update()
    return grad_norm, scale is not None and scaler.get_scale() < scale


def peak_tflops(args: argparse.Namespace, device: torch.device) -> Optional[float]:
    """--peak_tflops, else the dense bf16/fp16 peak of an H100/H200 (989 TFLOP/s), else None (no MFU)."""
    if args.peak_tflops:
        return args.peak_tflops
    if device.type == "cuda" and args.mixed_precision != "fp32" and any(gpu in torch.cuda.get_device_name(device) for gpu in ("H100", "H200")):
        return 989.0
    return None


def maybe_fail(step: int, rank: int) -> None:
    """Test hook: OPENDIT_TEST_KILL=RANK:STEP kills that rank after that step, on the first attempt only."""
    spec = os.environ.get("OPENDIT_TEST_KILL")
    if spec and not restarted_by_torchrun() and spec == f"{rank}:{step}":
        os._exit(17)


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
    for flag in ("vae", "text_encoder"):  # local model folders are stored absolute, so sample.py finds them from anywhere
        if getattr(args, flag) not in ("none", "ema", "mse") and os.path.exists(getattr(args, flag)):
            setattr(args, flag, os.path.abspath(getattr(args, flag)))
    mesh = build_mesh(info.world_size, args.sequence_parallel_size, device.type) if info.world_size > 1 else None  # ("dp", "sp")
    dp_rank, dp_size = dp_coordinate(mesh)
    seed = args.global_seed * dp_size + dp_rank  # data-parallel ranks draw different t and noise; sp peers the same
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_flush_denormal(True)  # CPU: denormal floats (from zero-initialised layers) are ~10x slower

    # Everything that can fail on user input comes before the experiment folder is made:
    resume_dir = resume_dir_for(args)
    resume_state = read_train_state(resume_dir) if resume_dir else None
    dataset = build_dataset(args, train=True)  # the built-in shapes when --data_path does not exist
    if dataset.num_classes == 0:  # unlabelled data (captions only): no label table, which would never get a gradient
        args.num_classes = 0
    vae = load_vae(args.vae, device)
    text_encoder = text_encoder_for(args, dataset, device)  # captions -> pooled CLIP (--captions); None without
    config = model_config(args, vae, text_encoder)
    if resume_state is not None and resume_state["config"]["model"] != config:
        raise UsageError(f"--load {resume_dir}: checkpoint model {resume_state['config']['model']} differs from the flags' {config}")
    model = build_model(config).to(device)
    flops_per_image = train_flops_per_sample(model)

    if resume_dir:
        experiment_dir = experiment_dir_of(resume_dir)
    else:  # chosen by rank 0: --experiment_dir, the folder of this run before a restart, or a new one
        choice = (args.experiment_dir or (restarted_by_torchrun() and run_experiment_dir(args.outputs)) or new_experiment_dir(args.outputs, args.model)) if info.is_main else None
        experiment_dir = broadcast_str(choice)
    checkpoint_dir = os.path.join(experiment_dir, "checkpoints")
    if info.is_main:
        os.makedirs(checkpoint_dir, exist_ok=True)
    barrier()
    logger = create_logger(experiment_dir, info.is_main)
    logger.info(f"Experiment folder: {experiment_dir}  (world size {info.world_size}, device {device})")

    if args.dataset == "auto" and not os.path.exists(args.data_path):
        logger.info(f"--data_path {args.data_path} does not exist: training on the built-in shapes data")

    # Parallelism, optimizer, EMA, diffusion:
    num_params = sum(p.numel() for p in model.parameters())
    amp_dtype = PRECISIONS[args.mixed_precision]
    sharded = mesh is not None and args.plugin != "ddp"  # FSDP2: mixed precision by parameter casting, not autocast
    train_model = parallelize(
        model,
        fused_adaln=args.enable_modulate_kernel or args.enable_layernorm_kernel,
        flash_attention=args.enable_flashattn,
        grad_checkpoint=args.grad_checkpoint,
        compile=args.compile,
        mesh=mesh,
        plugin=args.plugin,
        param_dtype=amp_dtype,
        sequence_parallel_type=args.sequence_parallel_type,
        sequence_parallel_overlap=args.sequence_parallel_overlap == "on",
        blocks_per_unit=args.fsdp_blocks_per_unit,
    )
    use_autocast = amp_dtype != torch.float32 and not sharded
    loss_scale = sp_size(mesh)  # sp peers hold partial gradients; DDP/FSDP average over dp x sp (opendit/parallelize.py)
    trainable = [p for p in model.parameters() if p.requires_grad]
    cuda = device.type == "cuda"
    opt = ShardedAdamW(trainable, lr=args.lr, weight_decay=args.weight_decay, fused=cuda, foreach=not cuda)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    ema = ShardedEMA(model)  # fp32, laid out like the (sharded) parameters; starts equal to the model
    diffusion = create_diffusion(timestep_respacing="", noise_schedule=args.noise_schedule)  # 1000 steps, learned-range sigma
    mode = "one process" if mesh is None else f"{args.plugin} over {info.world_size} processes (dp {dp_size} x sp {sp_size(mesh)})"
    logger.info(f"{args.model} parameters: {num_params:,}  config: {config}  parallelism: {mode}, {args.mixed_precision}")
    if info.is_main:
        with open(os.path.join(experiment_dir, "config.json"), "w") as f:
            json.dump({"args": vars(args), "model": config, "run_id": os.environ.get("TORCHELASTIC_RUN_ID")}, f, indent=2)

    # Data:
    sampler = ResumableSampler(dataset, num_replicas=dp_size, rank=dp_rank, shuffle=True, seed=args.global_seed, drop_last=True)
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
    train_steps, start_epoch, consumed, last_saved = 0, 0, 0, -1  # consumed: items of this epoch used by all dp ranks
    if resume_dir:
        rng = load_checkpoint(resume_dir, model, opt, ema)  # DCP reshards model, optimizer and EMA to this run's layout
        scaler.load_state_dict(resume_state["scaler"])
        scheduler.load_state_dict(resume_state["scheduler"])
        train_steps, start_epoch, consumed = resume_state["step"], resume_state["epoch"], resume_state["consumed"]
        last_saved = train_steps
        if resume_state["world_size"] != info.world_size or rng is None:
            logger.info(f"Resuming on {info.world_size} processes from a run on {resume_state['world_size']}: the RNG restarts")
        else:
            set_rng_state(rng)
        logger.info(f"Resumed from {resume_dir} at step {train_steps} (epoch {start_epoch}, {consumed} of its items done)")
    train_model.train()  # enables label dropout for classifier-free guidance

    if train_steps >= max_steps:
        logger.info(f"Nothing to do: step {train_steps} >= {max_steps}")
    metrics = MetricsWriter(experiment_dir, info.is_main)
    peak = peak_tflops(args, device)
    skipped_steps = 0

    def checkpoint(epoch: int, consumed: int) -> None:
        train_state = {
            "step": train_steps,
            "epoch": epoch,
            "consumed": consumed,
            "world_size": info.world_size,
            "dp_size": dp_size,
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "config": {"model": config, "args": vars(args)},
        }
        path = save_checkpoint(checkpoint_dir, train_steps, model, opt, ema, train_state, keep=args.ckpt_keep)
        logger.info(f"Saved checkpoint to {path}")

    from tqdm import tqdm

    progress = tqdm(total=max_steps, initial=train_steps, disable=not info.is_main or None, desc="train", dynamic_ncols=True)
    running = torch.zeros(3, device=device)  # loss, mse, vb sums since the last log
    log_steps, start_time = 0, time.time()
    epoch = start_epoch
    while train_steps < max_steps and epoch < args.epochs:
        sampler.set_epoch(epoch)
        sampler.start_index = consumed
        for batch in loader:
            x, model_kwargs = prepare_batch(batch, vae, text_encoder, device, train=True)  # latents; y and/or text
            t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=device)
            noise = torch.randn_like(x)
            if loss_scale > 1:  # sp peers share one sample: same latents, t and noise even if the VAE is not bit-exact
                broadcast_from_sp_leader(x, t, noise, *model_kwargs.values(), sp_group=mesh[SP].get_group())
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_autocast):
                loss_dict = diffusion.training_losses(train_model, x, t, model_kwargs, noise=noise)
            loss = loss_dict["loss"].mean()
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss * loss_scale if loss_scale > 1 else loss).backward()
            grad_norm, skipped = optimizer_step(opt, scaler, trainable, args.grad_clip)
            lr = scheduler.get_last_lr()[0]  # the rate this step used
            scheduler.step()
            if skipped:
                skipped_steps += 1
                logger.info(f"(step={train_steps + 1:07d}) fp16 gradient overflow: step skipped, loss scale now {scaler.get_scale():g}")
            else:
                ema.update(args.ema_decay)

            train_steps += 1
            consumed += args.batch_size * dp_size
            log_steps += 1
            maybe_fail(train_steps, info.rank)
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
                    "images_per_sec": log_steps * args.batch_size * dp_size / elapsed,
                    "lr": lr,
                }
                record["images_per_sec_per_gpu"] = record["images_per_sec"] / info.world_size
                if peak:
                    record["mfu"] = flops_per_image * record["images_per_sec_per_gpu"] / (peak * 1e12)
                if scaler.is_enabled():
                    record.update(loss_scale=scaler.get_scale(), skipped_steps=skipped_steps)
                if device.type == "cuda":
                    record["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
                logger.info(
                    f"(step={train_steps:07d}) loss: {avg[0]:.4f}, steps/s: {record['steps_per_sec']:.2f}, images/s: {record['images_per_sec']:.1f}"
                    + (f", MFU: {100 * record['mfu']:.1f}%" if "mfu" in record else "")
                    + (f", peak mem: {record['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in record else "")
                )
                progress.set_postfix(loss=f"{avg[0]:.4f}")
                metrics.write(record)
                running.zero_()
                log_steps, start_time = 0, time.time()
            if args.ckpt_every > 0 and train_steps % args.ckpt_every == 0:
                checkpoint(epoch, consumed)
                last_saved = train_steps
            if train_steps >= max_steps:
                break
        else:
            epoch += 1
            consumed = 0
            continue
        break
    if last_saved != train_steps:
        checkpoint(epoch, consumed)
    progress.close()
    metrics.close()
    logger.info("Done!")
    cleanup()


def main(argv: Optional[list] = None) -> None:
    run_or_exit(train, get_parser().parse_args(argv))


if __name__ == "__main__":
    main()
