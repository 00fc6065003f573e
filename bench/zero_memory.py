"""Per-GPU memory and speed of the data-parallel plugins on DiT-XL/2 at 256 (latents 4 x 32 x 32), as a markdown table.

    torchrun --standalone --nproc_per_node N bench/zero_memory.py [--batch_size 32] [--variants ddp:fp32,zero2:bf16,zero2:bf16:1,...]
        [--compile] [--profile VARIANT] [--sync_debug VARIANT]      (VARIANT: plugin:precision[:blocks per FSDP2 unit])
    torchrun --standalone --nproc_per_node 2 bench/zero_memory.py --tiny     # CPU (gloo) check of the script itself

Each variant builds the model, applies the plugin through opendit.parallel.parallelize, and trains --warmup + --steps steps
exactly as train.py does (hybrid loss at random t, backward, clipping, AdamW fused on CUDA, EMA update):

    state       bytes this rank holds for parameters + AdamW moments + EMA, counted tensor by tensor
                (DDP: everything replicated, a full fp32 EMA copy; zero2/zero3: 1/N shards, EMA sharded alike)
    resident    CUDA memory allocated after a step with the gradients freed (adds DDP's gradient buckets etc.)
                (memory and peak are counted above what was allocated when the variant started)
    peak        max CUDA memory allocated during the timed steps at --batch_size per GPU
    images/s    per GPU, over the timed steps

Memory numbers are the maximum over ranks.
"""
import argparse
import collections
import gc
import os
import sys
import time
import traceback
import warnings

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from opendit.builders import (
    PRECISIONS,  # noqa: E402
    build_model,  # noqa: E402
)
from opendit.diffusion import create_diffusion  # noqa: E402
from opendit.parallel import build_mesh, parallelize  # noqa: E402
from opendit.parallel.mesh import local_shard  # noqa: E402
from opendit.parallel.parallelize import BLOCKS_PER_UNIT  # noqa: E402
from opendit.parallel.process import cleanup, setup_distributed  # noqa: E402
from opendit.training.ema import ShardedEMA  # noqa: E402
from opendit.training.optim import ShardedAdamW, optimizer_step  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DiT-XL/2")
    p.add_argument("--latent_size", type=int, default=32, help="latent side (256 px / 8)")
    p.add_argument("--batch_size", type=int, default=32, help="per GPU")
    p.add_argument("--variants", default="ddp:fp32,ddp:bf16,zero2:bf16,zero3:bf16", help="plugin:precision[:blocks per FSDP2 unit, default train.py's], comma-separated")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--grad_checkpoint", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile each block (train.py --compile)")
    p.add_argument("--profile", default=None, help="plugin:precision whose 3 extra steps rank 0 profiles (top GPU and CPU ops)")
    p.add_argument("--sync_debug", default=None, help="plugin:precision whose one extra step rank 0 runs under CUDA sync debugging, printing where the host waited")
    p.add_argument("--tiny", action="store_true", help="2-block, width-64 model on 8 x 8 latents, batch 2 (runs on CPU)")
    return p.parse_args()


def local_bytes(tensors) -> int:
    """Bytes of this rank's pieces (DTensor: its local shard)."""
    return sum(local_shard(t).numel() * t.element_size() for t in tensors)


def optimizer_tensors(opt: torch.optim.Optimizer):
    return [v for state in opt.state.values() for v in state.values() if torch.is_tensor(v) and v.numel() > 1]


def max_over_ranks(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def profile(step, sync, show: bool) -> None:
    """Three steps under torch.profiler on every rank; rank 0 prints where GPU and CPU time went."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            step()
        sync()
    if show:
        events = prof.key_averages()
        for key in ("self_cuda_time_total", "self_cpu_time_total"):
            print(events.table(sort_by=key, row_limit=15, max_name_column_width=60))
        print("CPU time per step inside FSDP2's and the optimizer's annotated ranges (inclusive):")
        ranges = collections.defaultdict(lambda: [0.0, 0])  # range name without its module list -> [us, calls]
        for e in events:
            if e.key.startswith(("FSDP", "Optimizer")):
                ranges[e.key.split(" (")[0]][0] += e.cpu_time_total
                ranges[e.key.split(" (")[0]][1] += e.count
        for name, (us, calls) in sorted(ranges.items(), key=lambda item: -item[1][0]):
            print(f"  {name:50s} {us / 3e3:9.1f} ms  x{calls / 3:g}")


def report_syncs(step, show: bool) -> None:
    """One step with torch.cuda.set_sync_debug_mode("warn"): rank 0 prints each Python stack that made the host wait for the GPU."""
    stacks = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" in str(message):
            stacks["".join(traceback.format_stack(limit=7)[:-2])] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    if show:
        print(f"{sum(stacks.values())} synchronizing CUDA calls in one step")
        for stack, count in stacks.most_common():
            print(f"--- {count} x\n{stack}")


def parse_variant(variant: str) -> tuple:
    """"plugin:precision[:blocks per unit]" -> (plugin, precision, blocks per unit as a string; train.py's default)."""
    return tuple((variant.split(":") + [str(BLOCKS_PER_UNIT)])[:3])


def run_variant(args: argparse.Namespace, variant: str, mesh, device: torch.device, unit: int) -> dict:
    config = dict(model=args.model, input_size=args.latent_size, in_channels=4, num_classes=1000)
    if args.tiny:
        config.update(depth=2, hidden_size=64, num_heads=2)
    plugin, precision, blocks_per_unit = parse_variant(variant)
    cuda = device.type == "cuda"
    baseline = torch.cuda.memory_allocated(device) if cuda else 0  # whatever an earlier variant left behind
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(config)
    amp = PRECISIONS[precision]
    train_model = parallelize(model, grad_checkpoint=args.grad_checkpoint, compile=args.compile, blocks_per_unit=int(blocks_per_unit), mesh=mesh, plugin=plugin, param_dtype=amp)
    sharded = mesh.device_mesh is not None and plugin != "ddp"
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = ShardedAdamW(trainable, lr=1e-4, weight_decay=0, fused=cuda, foreach=not cuda)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    ema = ShardedEMA(model)
    diffusion = create_diffusion(timestep_respacing="")
    train_model.train()
    b, s = args.batch_size, args.latent_size

    def step() -> None:
        x = torch.randn(b, 4, s, s, device=device)
        t = torch.randint(0, diffusion.num_timesteps, (b,), device=device)
        y = torch.randint(0, 1000, (b,), device=device)
        with torch.autocast(device.type, dtype=amp, enabled=amp != torch.float32 and not sharded):
            loss = diffusion.training_losses(train_model, x, t, dict(y=y))["loss"].mean()
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        optimizer_step(opt, scaler, trainable, 1.0)
        ema.update(0.9999)

    for _ in range(args.warmup):
        step()
    opt.zero_grad(set_to_none=True)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    state = {"params": local_bytes(model.parameters()), "optimizer": local_bytes(optimizer_tensors(opt)), "ema": local_bytes(ema.shadow.values())}
    resident = torch.cuda.memory_allocated(device) - baseline if cuda else float("nan")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) - baseline if cuda else float("nan")
    if args.profile == variant:
        profile(step, sync, dist.get_rank() == 0 if dist.is_initialized() else True)
    if args.sync_debug == variant and cuda:
        report_syncs(step, dist.get_rank() == 0 if dist.is_initialized() else True)
    row = {name: max_over_ranks(v / unit, device) for name, v in state.items()}
    row.update(resident=max_over_ranks(resident / unit, device), peak=max_over_ranks(peak / unit, device), images_per_sec=b * args.steps / elapsed)
    del model, train_model, opt, ema, trainable
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def main() -> None:
    args = parse_args()
    if args.tiny:
        args.latent_size, args.batch_size, args.steps, args.warmup = 8, 2, 2, 1
    info = setup_distributed("cpu" if args.tiny else "auto")
    mesh = build_mesh(info.world_size, 1, info.device.type)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    unit, unit_name = (2**20, "MiB") if args.tiny else (2**30, "GiB")
    rows = []
    for variant in args.variants.split(","):
        rows.append((variant, run_variant(args, variant, mesh, info.device, unit)))
    if info.is_main:
        gpu = torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else "CPU"
        print(f"\n{args.model}{' (tiny)' if args.tiny else ''}, latents 4x{args.latent_size}x{args.latent_size}, batch {args.batch_size} per GPU, "
              f"{info.world_size} x {gpu}{', grad checkpointing' if args.grad_checkpoint else ''}{', compiled blocks' if args.compile else ''}"
              f"{' (one process: no plugin applies)' if mesh.device_mesh is None else ''}\n")
        print(f"| plugin | precision | blocks per unit | params {unit_name} | AdamW {unit_name} | EMA {unit_name} | state {unit_name} | resident {unit_name} | peak {unit_name} | images/s/GPU |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for variant, r in rows:
            plugin, precision, blocks_per_unit = parse_variant(variant)
            blocks_per_unit = "-" if plugin == "ddp" or mesh.device_mesh is None else blocks_per_unit
            total = r["params"] + r["optimizer"] + r["ema"]
            print(f"| {plugin} | {precision} | {blocks_per_unit} | {r['params']:.3f} | {r['optimizer']:.3f} | {r['ema']:.3f} | {total:.3f} | {r['resident']:.2f} | {r['peak']:.2f} | {r['images_per_sec']:.1f} |")
    cleanup()


if __name__ == "__main__":
    main()
