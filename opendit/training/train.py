"""Train a DiT or VDiT: `python train.py ...` on one process, or `torchrun ... train.py --plugin zero2|zero3|ddp ...`."""
import argparse
import importlib.util
import json
import os
import random
import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from opendit.builders import PRECISIONS, build_model, model_config
from opendit.checkpoint.dcp import load_checkpoint, read_train_state, save_checkpoint, verify_checkpoint_on_all_ranks
from opendit.checkpoint.layout import set_rng_state
from opendit.checkpoint.weights import is_opendit_folder, load_opendit_folder
from opendit.data import build_dataset, prepare_batch, text_encoder_for
from opendit.data.robust import error_line, inner_dataset
from opendit.data.seeded import EpochSeeded
from opendit.encoders import load_vae
from opendit.errors import UsageError, run_or_exit
from opendit.parallel import build_mesh, parallelize
from opendit.parallel.mesh import ParallelMesh
from opendit.parallel.process import DistInfo, cleanup, setup_distributed
from opendit.training.args import check_flags, check_resume_flags, check_sequence_parallel_tokens, get_parser
from opendit.training.experiment import check_experiment_dir, check_load_path, open_experiment, restarted_by_torchrun, resume_dir_for
from opendit.training.graph_step import maybe_graph_step
from opendit.training.guard import DivergenceError, non_finite_tensors
from opendit.training.metrics import Meter, MetricsWriter, log_line, peak_tflops
from opendit.training.preemption import PREEMPTED_STATUS, Preempted, StopSignals
from opendit.training.preview import Preview
from opendit.training.profile import StepProfiler, parse_steps
from opendit.training.sampler import EpochBatches, EpochBatchSampler, ResumableSampler
from opendit.training.step import TrainStep, build_train_step
from opendit.utils.cli import plural
from opendit.utils.flops import train_flops_per_sample

NOT_COMPARED = ("load", "experiment_dir", "outputs")  # where to resume from and write to, not how to train


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_flush_denormal(True)  # CPU: denormal floats (from zero-initialised layers) are ~10x slower


def maybe_fail(step: int, rank: int) -> None:
    """Test hook: OPENDIT_TEST_KILL=RANK:STEP kills that rank after that step, on the first attempt only."""
    spec = os.environ.get("OPENDIT_TEST_KILL")
    if spec and not restarted_by_torchrun() and spec == f"{rank}:{step}":
        os._exit(17)


def use_sharing_strategy(strategy: str) -> None:
    """--sharing_strategy for the workers' batches; file_system's torch_shm_manager starts here, so a host that cannot
    run it stops with one line before training instead of in a worker."""
    torch.multiprocessing.set_sharing_strategy(strategy)
    if strategy == "file_system":
        try:
            torch.zeros(1).share_memory_()
        except RuntimeError as e:
            raise UsageError(f"--sharing_strategy file_system: {error_line(e)} (use file_descriptor)") from None


def build_loader(args: argparse.Namespace, dataset, mesh, seed: int, device: torch.device) -> tuple:
    """The DataLoader over this dp rank's share of each epoch, and its resumable sampler."""
    if args.num_workers > 0:
        use_sharing_strategy(args.sharing_strategy)
    sampler = ResumableSampler(dataset, num_replicas=mesh.dp_size, rank=mesh.dp_rank, shuffle=True, seed=args.global_seed, drop_last=True)
    generator = torch.Generator().manual_seed(seed)  # keeps the global RNG untouched, so resume is exact
    batch_sampler = EpochBatchSampler(sampler, args.batch_size, args.epochs)  # (epoch, index) keys, all epochs in one iterator
    loader = DataLoader(dataset, batch_sampler=batch_sampler, num_workers=args.num_workers, pin_memory=device.type == "cuda", generator=generator)
    if len(sampler) // args.batch_size == 0:
        raise UsageError(f"--batch_size {args.batch_size}: larger than the {len(sampler)} items each rank gets per epoch")
    return loader, sampler


@dataclass
class Setup:
    """What set-up hands the loop; everything that can fail on user input was checked while making it."""

    args: argparse.Namespace
    info: DistInfo
    mesh: ParallelMesh
    model: torch.nn.Module
    config: dict
    dataset: EpochSeeded
    loader: DataLoader
    sampler: ResumableSampler
    max_steps: int
    vae: object
    text_encoder: object
    resume_dir: Optional[str]  # a checkpoint of this project to resume
    resume_state: Optional[dict]
    opendit_init: Optional[str]  # an OpenDiT checkpoint folder: initial weights only


def train(args: argparse.Namespace) -> None:
    setup = prepare(args)
    experiment_dir, logger, lock = open_experiment(args, setup.resume_dir, setup.info)  # locked against a second live run
    try:
        run(setup, experiment_dir, logger)
    finally:
        lock.release()
    cleanup()


def prepare(args: argparse.Namespace) -> Setup:
    """Process group, mesh, seeds, the checkpoint to resume, data, encoders and the model, before any file is written."""
    info = setup_distributed(args.device)
    device = info.device
    check_flags(args, info.world_size)
    for flag in ("vae", "text_encoder"):  # local model folders are stored absolute, so sample.py finds them from anywhere
        if getattr(args, flag) not in ("none", "ema", "mse") and os.path.exists(getattr(args, flag)):
            setattr(args, flag, os.path.abspath(getattr(args, flag)))
    mesh = build_mesh(info.world_size, args.sequence_parallel_size, device.type)
    seed = args.global_seed * mesh.dp_size + mesh.dp_rank  # data-parallel ranks draw different t and noise; sp peers the same
    seed_everything(seed)
    if args.load not in (None, "auto"):
        check_load_path(args.load)
    opendit_init = args.load if args.load not in (None, "auto") and is_opendit_folder(args.load) else None  # weights only
    resume_dir = None if opendit_init else resume_dir_for(args)
    check_experiment_dir(args, resume_dir)
    if resume_dir:
        verify_checkpoint_on_all_ranks(resume_dir)  # the ranks split its checksums; the reads below find it verified
    resume_state = read_train_state(resume_dir) if resume_dir else None  # verifies the manifest and DCP metadata
    check_resume_flags(args, resume_state, resume_dir)
    dataset = EpochSeeded(build_dataset(args, train=True), args.global_seed)  # flips, crops, clip windows from (seed, epoch, index)
    if dataset.num_classes == 0:  # unlabelled data (captions only): no label table, which would never get a gradient
        args.num_classes = 0
    vae = load_vae(args.vae, device)
    text_encoder = text_encoder_for(args, dataset, device)  # captions -> pooled CLIP (--captions); None without
    config = model_config(args, vae, text_encoder)
    if resume_state is not None and resume_state["config"]["model"] != config:
        raise UsageError(f"--load {resume_dir}: checkpoint model {resume_state['config']['model']} differs from the flags' {config}")
    model = build_model(config).to(device)
    check_sequence_parallel_tokens(args, model)
    loader, sampler = build_loader(args, dataset, mesh, seed, device)
    max_steps = args.max_steps or args.epochs * (len(sampler) // args.batch_size)
    return Setup(args, info, mesh, model, config, dataset, loader, sampler, max_steps, vae, text_encoder, resume_dir, resume_state, opendit_init)


def run(setup: Setup, experiment_dir: str, logger) -> None:
    """Parallelize, resume, then the loop: steps, the divergence guard, logs, checkpoints, preemption, previews."""
    args, info, mesh, model, config, dataset, loader, sampler = (setup.args, setup.info, setup.mesh, setup.model, setup.config, setup.dataset, setup.loader, setup.sampler)
    max_steps, vae, text_encoder, resume_dir, resume_state = setup.max_steps, setup.vae, setup.text_encoder, setup.resume_dir, setup.resume_state
    device = info.device
    logger.info(f"{args.model} parameters: {sum(p.numel() for p in model.parameters()):,}  config: {config}  parallelism: {mesh.describe(args.plugin)}, {args.mixed_precision}")
    logger.info(f"Dataset: {type(inner_dataset(dataset)).__name__} with {len(dataset):,} items, {len(sampler) // args.batch_size} steps per epoch")
    flops_per_image = train_flops_per_sample(model)
    ema_init = init_from_opendit(setup.opendit_init, model, logger) if setup.opendit_init else None
    train_model = parallelize(
        model, mesh, plugin=args.plugin, param_dtype=PRECISIONS[args.mixed_precision], blocks_per_unit=args.fsdp_blocks_per_unit,
        fused_adaln=args.enable_modulate_kernel or args.enable_layernorm_kernel, flash_attention=args.enable_flashattn,
        grad_checkpoint=args.grad_checkpoint, compile=args.compile, low_precision_residual=args.bf16_residual,
        sequence_parallel_type=args.sequence_parallel_type, sequence_parallel_overlap=args.sequence_parallel_overlap == "on",
    )  # fmt: skip
    kernels = getattr(model, "kernels", None)
    if getattr(kernels, "quack_mlp", False):
        logger.info("GEMMs: fc1's GELU and its gradient in quack's GEMM epilogues, the other forward and input-gradient GEMMs quack's "
                    "too (quack-kernels; OPENDIT_QUACK=0 turns this off)")
    elif getattr(kernels, "fused_boundaries", False) and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9 \
            and os.environ.get("OPENDIT_QUACK", "1") != "0" and importlib.util.find_spec("quack") is None:
        logger.info("tip: pip install \"quack-kernels[cu13]\" (CUDA 12 builds of PyTorch: quack-kernels) runs fc1's GELU in quack's GEMM "
                    "epilogues, +5% a step on an H200 (README, Install)")
    train_step = maybe_graph_step(args, build_train_step(args, model, train_model, mesh, max_steps), info.world_size, device)
    if ema_init is not None:
        train_step.ema.load_full(ema_init)
    step, epoch, consumed, bad_samples = resume(args, resume_dir, resume_state, model, train_step, dataset, info.world_size, logger) if resume_dir else (0, 0, 0, 0)
    if info.is_main:  # only once --load has loaded: a failing resume leaves the experiment's config.json alone
        with open(os.path.join(experiment_dir, "config.json"), "w") as f:
            json.dump({"args": vars(args), "model": config, "run_id": os.environ.get("TORCHELASTIC_RUN_ID")}, f, indent=2)
    if step >= max_steps:
        logger.info(f"Nothing to do: step {step} >= {max_steps}")
    last_saved = step if resume_dir else -1
    last_good = resume_dir or "none written yet"
    train_model.train()  # enables label dropout for classifier-free guidance

    def checkpoint() -> None:
        nonlocal last_good
        if non_finite_tensors(finite_check_tensors(model, train_step)).item():
            raise DivergenceError(f"refusing to write the step-{step} checkpoint: non-finite weights, EMA or optimizer state; the last good checkpoint is {last_good}")
        train_state = {"step": step, "epoch": epoch, "consumed": consumed, "world_size": info.world_size, "dp_size": mesh.dp_size,
                       "config": {"model": config, "args": vars(args)}, "bad_samples": bad_sample_counts(bad_samples)}
        last_good = save_checkpoint(os.path.join(experiment_dir, "checkpoints"), step, model, train_step.optimizer, train_step.ema, {**train_state, **train_step.state_dict()}, keep=args.ckpt_keep)
        logger.info(f"Saved checkpoint to {last_good}")

    # Loop:
    metrics = MetricsWriter(experiment_dir, info.is_main, resumed_step=step if resume_dir else 0)
    stop = StopSignals(device)
    check_every = 1 if not train_step.on_device_skip else args.log_every  # divergence counters: read for free on CPU
    preview = Preview(args, config, dataset, vae, text_encoder, device, experiment_dir, info.is_main, metrics.tb if info.is_main else None) if args.sample_every > 0 else None
    meter = Meter(device, args.batch_size * mesh.dp_size, info.world_size, flops_per_image, peak_tflops(args, device))
    progress = tqdm(total=max_steps, initial=step, disable=not info.is_main or None, desc="train", dynamic_ncols=True)
    profile_steps = parse_steps(args.profile_steps)
    profiler = StepProfiler(profile_steps, max_steps, os.path.join(experiment_dir, "profile"), device, logger) if profile_steps and info.is_main else None
    epoch_batches = EpochBatches(loader)
    while step < max_steps and epoch < args.epochs:
        for batch in epoch_batches(epoch, consumed):
            # Step:
            if profiler is not None:
                profiler.before(step + 1)
            x, model_kwargs = prepare_batch(batch, vae, text_encoder, device, train=True)  # latents; y and/or text
            bad_samples += int(batch["bad_reads"].sum()) if "bad_reads" in batch else 0  # a CPU tensor: no sync
            result = train_step(x, model_kwargs)
            if result.skipped:
                logger.info(f"(step={step + 1:07d}) fp16 gradient overflow: step skipped, loss scale now {train_step.scaler.get_scale():g}")
            step, consumed = step + 1, consumed + args.batch_size * mesh.dp_size
            maybe_fail(step, info.rank)
            meter.add(result.loss_dict)
            progress.update(1)
            if profiler is not None:
                profiler.after(step)
            if step % check_every == 0 or step == max_steps or (args.ckpt_every > 0 and step % args.ckpt_every == 0):
                train_step.guard.check(step, last_good, logger, end=step >= max_steps)
            # Log:
            if step % args.log_every == 0 or step == max_steps:
                record = {**meter.record(step, epoch, result.grad_norm, result.lr), **train_step.scaler_metrics()}
                logger.info(log_line(record))
                progress.set_postfix(loss=f"{record['loss']:.4f}")
                metrics.write(record)
            # Checkpoint:
            if args.ckpt_every > 0 and step % args.ckpt_every == 0:
                checkpoint()
                last_saved = step
            # Preview:
            if preview is not None and step % args.sample_every == 0:
                logger.info(f"Samples of step {step}: {preview(step, train_step.ema.state_dict())}")
            if stop.should_stop(step):
                train_step.guard.check(step, last_good, logger)
                if last_saved != step:
                    checkpoint()
                logger.info(f"(step={step:07d}) stop signal received: checkpoint written, exiting with status {PREEMPTED_STATUS}; resume with --load auto")
                metrics.close()
                raise Preempted()
            if step >= max_steps:
                break
        else:
            epoch, consumed = epoch + 1, 0
    train_step.guard.check(step, last_good, logger, end=True)  # a run ending in non-finite steps stops as diverged
    if last_saved != step:
        checkpoint()
    stop.restore()
    progress.close()
    metrics.close()
    logger.info("Done!")


def finite_check_tensors(model: torch.nn.Module, train_step: TrainStep) -> list:
    """This rank's shards of the weights, the EMA and the optimizer moments (what a checkpoint would hold)."""
    from opendit.parallel.mesh import local_shard

    tensors = [local_shard(t) for t in model.state_dict().values()] + [local_shard(t) for t in train_step.ema.state_dict().values()]
    return tensors + [local_shard(v) for state in train_step.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]


def bad_sample_counts(count: int) -> list:
    """Every rank's count of bad samples replaced in the batches it trained on (gathered: rank 0 writes train_state)."""
    import torch.distributed as dist

    counts = [count]
    if dist.is_initialized():
        counts = [None] * dist.get_world_size()
        dist.all_gather_object(counts, count)
    return counts


def restored_bad_samples(dataset, counts: list, rank: int) -> int:
    """This rank's count to continue from: its own (same world size), else rank 0 carries the total; the skip log's
    numbering continues from it."""
    count = counts[rank] if rank < len(counts) and len(counts) > 1 else (sum(counts) if rank == 0 else 0)
    if hasattr(dataset, "skipped"):
        dataset.skipped.value = count
    return count


def init_from_opendit(path: str, model: torch.nn.Module, logger) -> dict:
    """--load with an OpenDiT checkpoint folder: its model/ weights into the model (strict); returns the EMA weights
    (ema.pt, or the model's when there is none). The optimizer, EMA step count and position are not resumed."""
    weights = load_opendit_folder(path, use_ema=False)
    ema = load_opendit_folder(path, use_ema=True)
    for name, state in (("model", weights), ("ema", ema)):
        missing, unexpected = set(model.state_dict()) - set(state), set(state) - set(model.state_dict())
        if missing or unexpected:
            raise UsageError(f"--load {path}: OpenDiT {name} weights do not fit the flags' model (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise UsageError(f"--load {path}: OpenDiT weights do not fit the flags' model ({str(e).splitlines()[1].strip()})") from None
    logger.info(f"--load {path}: an OpenDiT checkpoint: weights only (model and EMA); the optimizer, EMA history and step are not resumed, training starts at step 0")
    return ema


def resume(args, resume_dir: str, resume_state: dict, model: torch.nn.Module, train_step: TrainStep, dataset, world_size: int, logger) -> tuple:
    """Load a checkpoint into the (parallelized) model, optimizer, EMA, scaler and LR schedule, and the RNG when the
    world size is unchanged. Returns (step, epoch, items of that epoch consumed by all dp ranks, this rank's bad samples)."""
    rng = load_checkpoint(resume_dir, model, train_step.optimizer, train_step.ema)  # DCP reshards model, optimizer and EMA to this run's layout
    train_step.load_state_dict(resume_state, args.lr, args.weight_decay)  # this run's --lr, schedule, weight decay win
    changed = changed_flags(args, resume_state["config"]["args"])
    if changed:
        logger.info(f"Resume: changed flags: {', '.join(changed)}")
    bad_samples = restored_bad_samples(dataset, resume_state.get("bad_samples", []), _rank())
    if resume_state["world_size"] != world_size or rng is None:
        logger.info(f"Resuming on {plural(world_size, 'process', 'processes')} from a run on {resume_state['world_size']}: the RNG restarts")
    else:
        set_rng_state(rng)
    step, epoch, consumed = resume_state["step"], resume_state["epoch"], resume_state["consumed"]
    logger.info(f"Resumed from {resume_dir} at step {step} (epoch {epoch}, {consumed} of its items done)")
    return step, epoch, consumed, bad_samples


def changed_flags(args: argparse.Namespace, saved: dict) -> list:
    """"--flag value (was old)" for each flag that differs from the checkpoint's run (where the run's files go aside)."""
    return [f"--{flag} {value} (was {saved[flag]})" for flag, value in vars(args).items() if flag in saved and flag not in NOT_COMPARED and saved[flag] != value]


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def main(argv: Optional[list] = None) -> None:
    """Status 0: done; 2: a user mistake (one line); 3: stopped by SIGTERM / SIGUSR1 after a checkpoint; 4: diverged."""
    try:
        run_or_exit(train, get_parser().parse_args(argv))
    except Preempted:
        cleanup()
        sys.exit(PREEMPTED_STATUS)
    except DivergenceError as e:
        print(f"error: {e}", file=sys.stderr)
        cleanup()
        sys.exit(4)


if __name__ == "__main__":
    main()
