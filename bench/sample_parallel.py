"""Multi-GPU sampling: the latency of one batch (DiT-XL/2 at 256, random weights, CFG) on N ranks per layout, against
one GPU, and sample_ddp.py's throughput on N ranks, as markdown tables.

    torchrun --standalone --nproc_per_node N bench/sample_parallel.py [--images 8] [--steps 250] [--variants eager,graph,compile] [--ddp_batch 64]
    torchrun --standalone --nproc_per_node 2 bench/sample_parallel.py --tiny      # CPU + gloo smoke check

Layouts of the N ranks (sample.py's world = dp x cfg x sp; opendit/sampling/layout.py):
    1 GPU       rank 0 alone, the others wait (the baseline of the speed-up column)
    sp N        every rank holds 1/N of each image's tokens (--sequence_parallel_size N)
    cfg x sp    the conditional and unconditional halves on two rank groups of N/2 (--cfg_parallel)
    dp N        each rank samples its share of the images alone (torchrun sample.py without sp / cfg)
Variants (sample.py's flags, bf16 weights, the GELU epilogue):
    eager       bf16 + --enable_flashattn
    graph       + --enable_modulate_kernel --cuda_graph (each step one CUDA graph, not compiled)
    compile     bf16 + --enable_flashattn --compile (per block under sp, the whole model otherwise)
A row's seconds are the slowest rank's wall time for the whole batch, second call (the first compiles and captures);
"graphs" says whether the engine captured the step (opendit/sampling/denoise.py decides). "rel. diff" is
||x - x_1|| / ||x_1|| of the batch's DDIM-50 latents against the 1-GPU row of the same variant: 0 where the layout
computes the same numbers; with random weights the 50 steps amplify rounding differences (other GEMM shapes) to
~1e-2, while a wrong split of the work gives ~1.

--ddp_batch B adds sample_ddp.py's use (FID-50K): every rank samples its own B images (cfg 1.5, 250 DDPM steps,
timed over --ddp_steps steps), images/s over the N ranks and per rank.
"""
import argparse
import copy
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from opendit.models import DiT, DiT_models  # noqa: E402
from opendit.parallel.process import run_script, setup_distributed  # noqa: E402
from opendit.sampling.denoise import _ENGINES, denoise, get_engine  # noqa: E402
from opendit.sampling.layout import SamplingLayout, build_layout  # noqa: E402
from opendit.sampling.sample import cast_matmul_weights, speed_up  # noqa: E402
from timing import sync  # noqa: E402  (bench/timing.py)

VARIANTS = {  # name -> sample.py's speed flags
    "eager": dict(mixed_precision="bf16", enable_flashattn=True),
    "graph": dict(mixed_precision="bf16", enable_flashattn=True, enable_modulate_kernel=True, cuda_graph=True),
    "compile": dict(mixed_precision="bf16", enable_flashattn=True, compile=True),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--variants", type=str, default="eager,graph,compile")
    p.add_argument("--layouts", type=str, default="1,sp,cfg,dp", help="comma-separated: 1 (rank 0 alone), sp, cfg (cfg 2 x sp N/2), dp")
    p.add_argument("--ddp_batch", type=int, default=0, help="also time sample_ddp.py's use at this batch per rank (0: skip)")
    p.add_argument("--ddp_steps", type=int, default=25)
    p.add_argument("--tiny", action="store_true", help="a 2-block DiT at 64 px (fp32, eager) on the CPU over gloo: a smoke check of the script")
    return p.parse_args()


def flags(variant: dict, **kw) -> argparse.Namespace:
    base = dict(sampler="ddpm", num_sampling_steps=250, noise_schedule="linear", cfg_scale=4.0, cfg_channels="3", num_classes=1000, vae="ema",
                mixed_precision="bf16", enable_flashattn=False, enable_modulate_kernel=False, compile=False, cuda_graph=False, gelu_epilogue=True,
                sequence_parallel_size=1)
    return argparse.Namespace(**{**base, **variant, **kw})


def layouts(names: list, rank: int, world: int, device_type: str) -> dict:
    """name -> (label, this rank's SamplingLayout or None where it sits out); every rank builds every group, in order."""
    out = {}
    for name in names:
        if name == "1":
            out[name] = ("1 GPU", SamplingLayout() if rank == 0 else None)
        elif name == "sp":
            out[name] = (f"sp {world}", build_layout(rank, world, world, False, device_type))
        elif name == "cfg" and world % 2 == 0:
            sp = world // 2
            out[name] = (f"cfg 2 x sp {sp}" if sp > 1 else "cfg 2", build_layout(rank, world, sp, True, device_type))
        elif name == "dp":
            out[name] = (f"dp {world}", build_layout(rank, world, 1, False, device_type))
    return out


def timed_batch(args, model, layout: SamplingLayout, z, y) -> tuple:
    """(first, second) call seconds of this rank's share of the batch, the slowest rank's; and its latents (the second
    call). A failure on any rank raises on every rank after the same collectives (no rank is left waiting)."""
    mine = layout.share(len(z)) if layout is not None else range(0)
    times, out = [], None
    for _ in range(2):
        dist.barrier()
        start, error = time.perf_counter(), None
        if layout is not None and len(mine):
            torch.manual_seed(1)  # DDPM's per-step noise: the same stream on every rank of a cfg / sp group
            try:
                with torch.no_grad():
                    out = denoise(args, model, z[mine.start : mine.stop], y[mine.start : mine.stop], cfg_group=layout.cfg_group)
            except Exception as e:  # e.g. out of memory on this rank: reported below, after the shared all-reduce
                error = e
        sync(z.device)
        elapsed = time.perf_counter() - start if layout is not None else 0.0
        stats = torch.tensor([elapsed, float(error is not None)], dtype=torch.float64, device=z.device)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        if stats[1].item():
            raise RuntimeError(f"{type(error).__name__}: {error}" if error is not None else "failed on another rank")
        times.append(stats[0].item())
    return times[0], times[1], out


def gather_batch(out, layout, n: int) -> torch.Tensor:
    """The batch's latents from every group leader (rank 0 alone for the 1-GPU row), in order, on every rank."""
    parts = [None] * dist.get_world_size()
    leader = out is not None and layout.is_leader
    dist.all_gather_object(parts, (layout.share(n).start, out.cpu()) if leader else None)
    return torch.cat([p for _, p in sorted((p for p in parts if p is not None), key=lambda p: p[0])])


def main() -> None:
    opts = parse_args()
    info = setup_distributed("cpu" if opts.tiny else "auto")
    if not dist.is_initialized():
        raise SystemExit("run with torchrun --nproc_per_node N (N >= 2)")
    rank, world, device = info.rank, info.world_size, info.device
    torch.backends.cuda.matmul.allow_tf32 = True
    model_name, size = ("DiT depth 2 width 64", 64) if opts.tiny else ("DiT-XL/2", 256)
    latent = (4, size // 8, size // 8)
    variants = ["eager"] if opts.tiny else opts.variants.split(",")
    extra = dict(mixed_precision="fp32", enable_flashattn=False) if opts.tiny else {}
    names = opts.layouts.split(",")
    plan = layouts(names, rank, world, device.type)

    torch.manual_seed(0)
    with torch.device(device):  # --tiny: 8 heads, so that sp 2, 4 and 8 divide them
        base = DiT(depth=2, hidden_size=64, num_heads=8, input_size=size // 8, num_classes=1000) if opts.tiny else DiT_models[model_name](input_size=size // 8, num_classes=1000)
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0, 0.02)  # adaLN-Zero init would zero every block
    if not opts.tiny:
        cast_matmul_weights(base, torch.bfloat16)
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(opts.images, *latent, generator=gen).to(device)
    y = torch.randint(0, 1000, (opts.images,), generator=gen).to(device)
    if rank == 0:
        name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
        print(f"# {world} x {name}, torch {torch.__version__}, {model_name} at {size}, {opts.images} images + CFG, {opts.steps} DDPM steps\n")
        print("| variant | layout | seconds | first call | speed-up vs 1 GPU | graphs | DDIM-50 rel. diff vs 1 GPU |\n|---|---|---:|---:|---:|---|---:|")

    for variant in variants:
        one, ref = None, None
        for key, (label, layout) in plan.items():
            sp = layout.sp if layout is not None else 1
            args = flags(VARIANTS[variant], num_sampling_steps=opts.steps, sequence_parallel_size=sp, **extra)
            model = None
            try:
                model = speed_up(args, copy.deepcopy(base), layout.mesh) if layout is not None else None
                first, second, _ = timed_batch(args, model, layout, z, y)
                graphs = layout is not None and model is not None and get_engine(args, model, device, layout.cfg_group).cuda_graph
                flag = torch.tensor(int(bool(graphs)), device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                ddim = flags(VARIANTS[variant], sampler="ddim", num_sampling_steps=50, sequence_parallel_size=sp, **extra)
                _, _, out = timed_batch(ddim, model, layout, z, y)
                latents = gather_batch(out, layout, opts.images)
            except Exception as e:  # report and go on: one failing layout should not cost the other rows
                if rank == 0:
                    print(f"| {variant} | {label} | failed: {type(e).__name__}: {str(e)[:200]} | | | | |", flush=True)
                continue
            finally:
                _ENGINES.clear()
            if key == "1":
                one, ref = second, latents
            speed = f"{one / second:.2f}x" if one else ""
            diff = f"{((latents.float() - ref.float()).norm() / ref.float().norm()).item():.1e}" if ref is not None else ""
            if rank == 0:
                print(f"| {variant} | {label} | {second:.2f} | {first:.2f} | {speed} | {'yes' if flag.item() else 'no'} | {diff} |", flush=True)
            del model

    if opts.ddp_batch:
        if rank == 0:
            print(f"\n## sample_ddp.py on {world} ranks: batch {opts.ddp_batch} per rank, cfg 1.5, 250 DDPM steps ({opts.ddp_steps} timed)\n")
            print("| variant | images/s (all ranks) | images/s per rank | graphs |\n|---|---:|---:|---|")
        layout = plan["dp"][1] if "dp" in plan else build_layout(rank, world, 1, False, device.type)
        gen = torch.Generator().manual_seed(3)
        zb = torch.randn(opts.ddp_batch * world, *latent, generator=gen).to(device)
        yb = torch.randint(0, 1000, (opts.ddp_batch * world,), generator=gen).to(device)
        for variant in variants:
            args = flags(VARIANTS[variant], cfg_scale=1.5, num_sampling_steps=opts.ddp_steps, **extra)
            model = speed_up(args, copy.deepcopy(base))
            try:
                _, second, _ = timed_batch(args, model, layout, zb, yb)
                graphs = get_engine(args, model, device).cuda_graph
            except Exception as e:
                if rank == 0:
                    print(f"| {variant} | failed: {type(e).__name__}: {str(e)[:200]} | | |", flush=True)
                continue
            finally:
                _ENGINES.clear()
            per_rank = opts.ddp_batch / (second * 250 / opts.ddp_steps)
            if rank == 0:
                print(f"| {variant} | {per_rank * world:.1f} | {per_rank:.1f} | {'yes' if graphs else 'no'} |", flush=True)
            del model
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    run_script(main)
