"""Sequence parallelism: per-layer time, exposed and raw communication of FastSeq (ring overlap on/off) and Ulysses.

    torchrun --standalone --nproc_per_node N bench/sequence_parallel.py [--tokens 4096,...,65536] [--e2e_tokens 16384]
    torchrun --standalone --nproc_per_node 2 bench/sequence_parallel.py --tiny      # CPU + gloo smoke check

One layer is a VDiT-XL block (hidden 1152, 16 heads of 72, MLP 4x) under bf16 autocast with fp32 weights, batch 1,
forward + backward (input, condition and weight gradients), on the local shard of N / sp tokens; sp = every rank
(or --sp_size). Every time is the slowest rank's mean over --iters after --warmup.

    layer       the sequence-parallel layer, communication included
    compute     the same layer with its collectives replaced by local copies of the same shapes (no communication)
    exposed     layer - compute: the communication the layer does not hide
    raw comm    the layer's collectives alone, back to back (FastSeq: all-gather or its ring + output all-to-all,
                and their backward; Ulysses: the q/k/v all-to-all + output all-to-all, and their backward)
    hidden      1 - exposed / raw comm
    speedup     sp=1 layer time (the full sequence on rank 0 alone, same run) / layer

--e2e_tokens adds a full training step of VDiT-XL/1x2x2 (28 blocks, latents 4 x frames x 32 x 32: 256 tokens a
frame) per mode: DiT's hybrid loss, backward, the sp gradient sum, clipping and AdamW. sp=1 runs on rank 0; an
out-of-memory there is reported as OOM.

--model latte times one Latte-XL block pair (a spatial then a temporal block, hidden 1152, 16 heads) in its steady
state, fwd+bwd under bf16 autocast, at 256 px (latents 32 x 32, patch 2: 256 positions a frame) for --frames:
    dsp        shard of t/sp frames; all-to-all to s/sp positions, temporal block, all-to-all back, spatial block
    ulysses    shard of s/sp positions throughout; Ulysses attention in the spatial block, temporal block local
    sp=1       the pair on the full sequence on rank 0 alone
with the all-to-alls per pair (fwd+bwd) and the bytes each rank sends in them (counted on the collectives).
Expected bytes per token and pair: dsp moves the hidden state there and back (2 D, in the residual stream's dtype:
fp32 for Latte) forward and again backward; ulysses moves q, k, v and the output (4 D, bf16 under autocast) forward
and again backward, and nothing in the temporal block (positions are local there). So dsp sends as many bytes as
this ulysses with an fp32 residual stream and would send half with a bf16 one; the DSP paper's 8 all-to-alls per
pair are a Ulysses that also shards the temporal block, which this layout does not need.

    torchrun --standalone --nproc_per_node N bench/sequence_parallel.py --model latte [--frames 16,32,64]
    torchrun --standalone --nproc_per_node 2 bench/sequence_parallel.py --model latte --tiny   # CPU + gloo
"""
import argparse
import contextlib
import copy
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from opendit.diffusion import create_diffusion  # noqa: E402
from opendit.models import VDiT_models  # noqa: E402
from opendit.models.blocks import DiTBlock  # noqa: E402
from opendit.models.latte import LatteBlock  # noqa: E402
from opendit.parallel import apply_sequence_parallel, build_mesh, collectives, sp_all_reduce_grads  # noqa: E402
from opendit.parallel.attention import FastSeqAttention, UlyssesAttention  # noqa: E402
from opendit.parallel.dsp import frames_to_positions, positions_to_frames  # noqa: E402
from opendit.parallel.parallelize import enable_fast_attention, enable_grad_checkpointing  # noqa: E402
from opendit.parallel.process import setup_distributed  # noqa: E402
from timing import timed  # noqa: E402  (bench/timing.py)

MODES = {"fastseq+overlap": ("fastseq", True), "fastseq": ("fastseq", False), "ulysses": ("ulysses", True)}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="4096,8192,16384,32768,65536", help="comma-separated sequence lengths")
    p.add_argument("--sp_size", type=int, default=0, help="sequence-parallel size (default: every rank)")
    p.add_argument("--hidden_size", type=int, default=1152)
    p.add_argument("--num_heads", type=int, default=16)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--e2e_tokens", type=int, default=16384, help="tokens of the end-to-end training step (0: skip)")
    p.add_argument("--e2e_steps", type=int, default=5)
    p.add_argument("--grad_checkpoint", action="store_true", help="end-to-end: recompute each block in the backward")
    p.add_argument("--model", choices=("vdit", "latte"), default="vdit", help="latte: DSP vs Ulysses on a Latte block pair")
    p.add_argument("--frames", default="16,32,64", help="--model latte: comma-separated latent frame counts")
    p.add_argument("--latent", type=int, default=32, help="--model latte: latent height = width (patch 2)")
    p.add_argument("--tiny", action="store_true", help="hidden 64, 4 heads, 64-256 tokens, 2 blocks, on the CPU with gloo")
    args = p.parse_args()
    if args.tiny:
        args.tokens, args.hidden_size, args.num_heads, args.iters, args.warmup = "64,256", 64, 4, 3, 1
        args.e2e_tokens, args.e2e_steps = min(args.e2e_tokens, 64), 2
        args.frames, args.latent = "4,8", 8
    return args


def _local_ring_exchange(send, recv, group):
    recv.copy_(send)
    return []


@contextlib.contextmanager
def no_communication():
    """Replace the sp collectives by local stand-ins with the same output shapes (compute-only timing)."""
    stand_ins = {
        "all_gather": lambda x, group: x.unsqueeze(0).expand(dist.get_world_size(group), *x.shape).contiguous(),
        "reduce_scatter": lambda x, group: x[0],
        "all_to_all": lambda x, group: x.contiguous(),
        "ring_exchange": _local_ring_exchange,
    }
    saved = {name: getattr(collectives, name) for name in stand_ins}
    for name, fn in stand_ins.items():
        setattr(collectives, name, fn)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(collectives, name, fn)


# --- one layer --------------------------------------------------------------------------------------------------
def layer_step(block: DiTBlock, x: torch.Tensor, c: torch.Tensor, grad: torch.Tensor, dtype: torch.dtype):
    """One forward + backward of the block under autocast; gradients of x, c and the weights."""

    def step():
        block.zero_grad(set_to_none=True)
        x.grad = c.grad = None
        with torch.autocast(x.device.type, dtype=dtype):
            out = block(x, c)
        out.backward(grad)

    return step


def raw_comm_step(kind: str, overlap: bool, x: torch.Tensor, group):
    """The layer's collectives alone on its shapes: forward then backward, no compute."""
    s = dist.get_world_size(group)
    B, n, C = x.shape
    out_chunks = x.new_empty(s, B, n, C // s)  # the attention output (FastSeq and Ulysses alike)

    def step():
        if kind == "ulysses":
            qkv = x.new_empty(s, 3, B, n, C // s)
            collectives.all_to_all(qkv, group)
            collectives.all_to_all(out_chunks, group)
            collectives.all_to_all(out_chunks, group)  # backward of the output all-to-all
            collectives.all_to_all(qkv, group)
            return
        if overlap and s > 1:
            chunks = x.new_empty(s, B, n, C)
            for step_ in range(s - 1):
                for work in collectives.ring_exchange(chunks[step_], chunks[step_ + 1], group):
                    work.wait()
            collectives.all_to_all(out_chunks, group)
            collectives.all_to_all(out_chunks, group)
            partial, received = x.new_empty(B, n, C), x.new_empty(B, n, C)
            for _ in range(s - 1):
                for work in collectives.ring_exchange(partial, received, group):
                    work.wait()
            return
        collectives.all_gather(x, group)
        collectives.all_to_all(out_chunks, group)
        collectives.all_to_all(out_chunks, group)
        collectives.reduce_scatter(x.new_empty(s, B, n, C), group)

    return step


def bench_layers(args, device, dtype, sp_group, rank) -> list:
    """Rows (tokens, mode, layer, compute, exposed, raw, sp1) for every token count and mode."""
    s, C, H = dist.get_world_size(sp_group), args.hidden_size, args.num_heads
    rows = []
    for N in [int(v) for v in args.tokens.split(",")]:
        torch.manual_seed(0)
        block = DiTBlock(C, H).to(device)
        if device.type == "cuda":
            enable_fast_attention(block)
        c = torch.randn(1, C, device=device, requires_grad=True)

        sp1 = None  # the full sequence on rank 0 alone; the others wait
        if rank == 0:
            x, grad = torch.randn(1, N, C, device=device, requires_grad=True), torch.randn(1, N, C, device=device)
            sp1 = timed(layer_step(block, x, c, grad, dtype), args.iters, device, warmup=args.warmup)
            del x, grad
        dist.barrier()

        x = torch.randn(1, N // s, C, device=device, requires_grad=True)  # (B, n, C): this rank's shard
        grad = torch.randn(1, N // s, C, device=device)
        for mode, (kind, overlap) in MODES.items():
            sp_block = copy.deepcopy(block)
            cls, options = (FastSeqAttention, {"overlap": overlap}) if kind == "fastseq" else (UlyssesAttention, {})
            cls.convert(sp_block.attn, sp_group, **options)
            step = layer_step(sp_block, x, c, grad, dtype)
            layer = timed(step, args.iters, device, sp_group, args.warmup)
            with no_communication():
                compute = timed(step, args.iters, device, sp_group, args.warmup)
            raw = timed(raw_comm_step(kind, overlap, x.detach().to(dtype), sp_group), args.iters, device, sp_group, args.warmup)
            rows.append((N, mode, layer, compute, layer - compute, raw, sp1))
            del sp_block, step
        del block, x, grad
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# --- end to end -------------------------------------------------------------------------------------------------
def e2e_model(args, device, tokens):
    """VDiT-XL/1x2x2 on 32 x 32 latents (256 tokens a frame), or a 2-block tiny one on 8 x 8 (16 a frame)."""
    latent = 8 if args.tiny else 32
    per_frame = (latent // 2) ** 2
    frames = max(1, tokens // per_frame)
    size = dict(depth=2, hidden_size=args.hidden_size, num_heads=args.num_heads) if args.tiny else {}
    model = VDiT_models["VDiT-XL/1x2x2"](input_size=latent, num_frames=frames, num_classes=1000, **size).to(device)
    if device.type == "cuda":
        enable_fast_attention(model)
    if args.grad_checkpoint:
        enable_grad_checkpointing(model)
    return model, (1, 4, frames, latent, latent)


def e2e_step(model, shape, device, dtype, sp_group):
    """One training step as train.py does it (fixed batch; the sp ranks share it)."""
    diffusion = create_diffusion(timestep_respacing="")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, device=device, generator=gen)
    noise = torch.randn(shape, device=device, generator=gen)
    t = torch.randint(0, 1000, (shape[0],), device=device, generator=gen)
    y = torch.randint(0, 1000, (shape[0],), device=device, generator=gen)

    def step():
        with torch.autocast(device.type, dtype=dtype):
            loss = diffusion.training_losses(model, x, t, dict(y=y), noise=noise)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if sp_group is not None:
            sp_all_reduce_grads(model, sp_group)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return step


def bench_e2e(args, device, dtype, sp_group, rank) -> list:
    """Rows (mode, seconds per step or None for OOM, peak GiB) for sp=1 on rank 0 and every sp mode."""
    rows, tokens = [], args.e2e_tokens
    if rank == 0:
        rows.append(("sp=1 (rank 0)", *run_e2e(args, device, dtype, tokens, None, None)))
    dist.barrier()
    for mode, (kind, overlap) in MODES.items():
        rows.append((mode, *run_e2e(args, device, dtype, tokens, sp_group, (kind, overlap))))
    return rows


def run_e2e(args, device, dtype, tokens, sp_group, sp_mode):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        model, shape = e2e_model(args, device, tokens)
        model.train()
        if sp_mode is not None:
            apply_sequence_parallel(model, sp_group, *sp_mode)
        seconds = timed(e2e_step(model, shape, device, dtype, sp_group), args.e2e_steps, device, sp_group, warmup=1)
    except torch.cuda.OutOfMemoryError:
        if sp_group is not None:
            raise
        seconds = None
    peak = round(torch.cuda.max_memory_allocated(device) / 2**30, 1) if device.type == "cuda" else None
    return seconds, peak


# --- Latte block pair: DSP vs Ulysses ---------------------------------------------------------------------------
@contextlib.contextmanager
def counting_all_to_all(group):
    """Count the all-to-alls and the bytes this rank sends in them ((s - 1) / s of each buffer)."""
    s, saved, seen = dist.get_world_size(group), collectives.all_to_all, {"calls": 0, "bytes": 0}

    def counted(x, group_):
        seen["calls"] += 1
        seen["bytes"] += x.numel() * x.element_size() * (s - 1) // s
        return saved(x, group_)

    collectives.all_to_all = counted
    try:
        yield seen
    finally:
        collectives.all_to_all = saved


def latte_pair_step(spatial: LatteBlock, temporal: LatteBlock, mode: str, x, c, grad, dtype, group):
    """One fwd+bwd of the pair on this rank's shard: dsp enters in the frames layout, ulysses / sp=1 run as given."""

    def step():
        spatial.zero_grad(set_to_none=True)
        temporal.zero_grad(set_to_none=True)
        x.grad = c.grad = None
        with torch.autocast(x.device.type, dtype=dtype):
            if mode == "dsp":  # (N, t/p, s, D) -> (N, t, s/p, D) -> temporal -> back -> spatial
                out = spatial(positions_to_frames(temporal(frames_to_positions(x, group), c), group), c)
            else:  # (N, t, s/p, D) throughout (sp=1: the full (N, t, s, D))
                out = temporal(spatial(x, c), c)
        out.backward(grad)

    return step


def bench_latte(args, device, dtype, sp_group, rank) -> list:
    """Rows (frames, tokens, mode, all-to-alls, MB sent per rank, pair seconds) per frame count and mode."""
    p, D, H = dist.get_world_size(sp_group), args.hidden_size, args.num_heads
    s = (args.latent // 2) ** 2
    rows = []
    for frames in [int(v) for v in args.frames.split(",")]:
        torch.manual_seed(0)
        spatial, temporal = LatteBlock(D, H).to(device), LatteBlock(D, H).to(device)
        temporal.kind = "temporal"
        if device.type == "cuda":
            enable_fast_attention(spatial), enable_fast_attention(temporal)
        c = torch.randn(1, D, device=device, requires_grad=True)
        if rank == 0:
            x, grad = torch.randn(1, frames, s, D, device=device, requires_grad=True), torch.randn(1, frames, s, D, device=device)
            seconds = timed(latte_pair_step(spatial, temporal, "sp=1", x, c, grad, dtype, None), args.iters, device, warmup=args.warmup)
            rows.append((frames, frames * s, "sp=1 (rank 0)", 0, 0.0, seconds))
            del x, grad
        dist.barrier()
        for mode in ("dsp", "ulysses"):
            shape = (1, frames // p, s, D) if mode == "dsp" else (1, frames, s // p, D)
            x, grad = torch.randn(shape, device=device, requires_grad=True), torch.randn(shape, device=device)
            spatial_mode = copy.deepcopy(spatial)
            if mode == "ulysses":
                UlyssesAttention.convert(spatial_mode.attn, sp_group)
            step = latte_pair_step(spatial_mode, temporal, mode, x, c, grad, dtype, sp_group)
            with counting_all_to_all(sp_group) as seen:
                step()
            seconds = timed(step, args.iters, device, sp_group, args.warmup)
            rows.append((frames, frames * s, mode, seen["calls"], seen["bytes"] / 2**20, seconds))
            del x, grad, spatial_mode, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def print_latte(rows, args, sp_size, name) -> None:
    print(f"\n## Latte block pair (spatial + temporal, hidden {args.hidden_size}, {args.num_heads} heads), fwd+bwd, bf16, "
          f"{(args.latent // 2) ** 2} positions a frame, sp = {sp_size}, {name}\n")
    print("| frames | tokens | mode | all-to-alls | MB sent per rank | pair ms | speedup vs sp=1 |")
    print("|---|---|---|---|---|---|---|")
    sp1 = {frames: seconds for frames, _, mode, _, _, seconds in rows if mode.startswith("sp=1")}
    for frames, tokens, mode, calls, mb, seconds in rows:
        print(f"| {frames} | {tokens} | {mode} | {calls} | {mb:.3f} | {1e3 * seconds:.2f} | {sp1[frames] / seconds:.2f}x |")


# --- main -------------------------------------------------------------------------------------------------------
def main() -> None:
    args = parse_args()
    info = setup_distributed("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    device, rank, world = info.device, info.rank, info.world_size
    if world < 2 or not dist.is_initialized():
        raise SystemExit("run with torchrun --nproc_per_node N (N >= 2)")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    sp_size = args.sp_size or world
    mesh = build_mesh(world, sp_size, device.type)
    sp_group = mesh.sp_group
    dtype = torch.bfloat16
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (gloo)"

    if args.model == "latte":
        rows = bench_latte(args, device, dtype, sp_group, rank)
        if rank == 0:
            print_latte(rows, args, sp_size, name)
        dist.barrier()
        dist.destroy_process_group()
        return

    rows = bench_layers(args, device, dtype, sp_group, rank)
    if rank == 0:
        print(f"\n## One block (hidden {args.hidden_size}, {args.num_heads} heads), fwd+bwd, bf16, sp = {sp_size}, {name}\n")
        print("| tokens | mode | layer ms | compute ms | exposed comm ms | raw comm ms | hidden | speedup vs sp=1 |")
        print("|---|---|---|---|---|---|---|---|")
        for N, mode, layer, compute, exposed, raw, sp1 in rows:
            hidden = f"{100 * min(1, max(0, 1 - exposed / raw)):.0f}%" if raw > 0 else "-"  # exposed > raw (skew, contention): 0%
            print(f"| {N} | {mode} | {1e3 * layer:.2f} | {1e3 * compute:.2f} | {1e3 * exposed:.2f} | {1e3 * raw:.2f} | {hidden} | {sp1 / layer:.2f}x |")
            if mode == "ulysses":
                print(f"| {N} | sp=1 (rank 0) | {1e3 * sp1:.2f} | {1e3 * sp1:.2f} | 0 | 0 | - | 1.00x |")

    if args.e2e_tokens > 0:
        e2e = bench_e2e(args, device, dtype, sp_group, rank)
        if rank == 0:
            model = "tiny VDiT (2 blocks)" if args.tiny else "VDiT-XL/1x2x2"
            print(f"\n## End-to-end training step, {model}, {args.e2e_tokens} tokens, batch 1, bf16, sp = {sp_size}, {name}\n")
            print("| mode | step s | tokens/s | peak GiB |")
            print("|---|---|---|---|")
            for mode, seconds, peak in e2e:
                speed = f"{seconds:.3f} | {args.e2e_tokens / seconds:,.0f}" if seconds is not None else "OOM | -"
                print(f"| {mode} | {speed} | {peak if peak is not None else '-'} |")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
