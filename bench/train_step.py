"""One-GPU training-step speed of a DiT (default DiT-XL/2 at 256) per speed-up, as a markdown table.

    python bench/train_step.py [--model DiT-B/2] [--batch_sizes 32,128] [--variants fp32,bf16,...,graph] [--time_cap 300]

A step is what train.py does: DiT hybrid loss (MSE + learned-sigma VB) at random timesteps on latents
(4 x 32 x 32, 1000 classes), backward, gradient clipping at 1.0, AdamW (fused) and an EMA update. Inputs are random
latents already on the GPU (the VAE is out of the step, as with a latent cache). MFU counts the model's training
FLOPs (6 x its multiply-adds per image: 711.8 GFLOP for DiT-XL/2 at 256) against a bf16 matmul peak measured in
the same run. Variants are cumulative where the name says so:

    fp32      all speed-ups off, fp32 with TF32 matmuls (what train.py does with --mixed_precision fp32)
    bf16      bf16 autocast (fp32 master weights)
    flash     bf16 + fused attention (--enable_flashattn: cuDNN/flash SDPA)
    kernels   bf16 + flash + Triton LayerNorm+modulate and gate+residual (--enable_modulate_kernel)
    compile   bf16 + flash + torch.compile of each block (inductor fuses the norms itself)
    all       bf16 + flash + kernels + compile
    diffusers diffusers' DiTTransformer2DModel of the same size, bf16 autocast (an external peer)
    whole     compile, but torch.compile of the whole model instead of each block
    bf16res   compile + the residual stream in bf16 (KernelChoice.low_precision_residual)
    step      compile, stepped by train.py's own TrainStep (LR schedule, loss dict, ShardedAdamW, ShardedEMA)
    graph     step, captured as one CUDA graph after warm-up (opendit.training.graph_step, train.py --cuda_graph)
    graph-eager  graph without torch.compile (bf16 + flash)
    graph-bf16res  graph + bf16res

`--tiny` runs a 2-block model on small inputs (a CPU smoke check of the script itself).
"""

import argparse
import os
import sys
import time
import traceback
from functools import partial

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from opendit.diffusion import create_diffusion  # noqa: E402
from opendit.models import DiT_models  # noqa: E402
from opendit.parallel.parallelize import compile_blocks, enable_fast_attention, enable_fused_adaln  # noqa: E402
from opendit.parallel.mesh import ParallelMesh  # noqa: E402
from opendit.training.ema import ShardedEMA  # noqa: E402
from opendit.training.graph_step import CudaGraphStep  # noqa: E402
from opendit.training.optim import ShardedAdamW, lr_factor  # noqa: E402
from opendit.training.step import TrainStep  # noqa: E402
from opendit.utils.flops import train_flops_per_sample  # noqa: E402

VARIANTS = {  # name -> (autocast dtype, fast attention, fused kernels, compile ("", "blocks", "model"), stepper, bf16 residual)
    "fp32": (torch.float32, False, False, "", "bench", False),
    "bf16": (torch.bfloat16, False, False, "", "bench", False),
    "flash": (torch.bfloat16, True, False, "", "bench", False),
    "kernels": (torch.bfloat16, True, True, "", "bench", False),
    "compile": (torch.bfloat16, True, False, "blocks", "bench", False),
    "all": (torch.bfloat16, True, True, "blocks", "bench", False),
    "diffusers": (torch.bfloat16, False, False, "", "bench", False),
    "whole": (torch.bfloat16, True, False, "model", "bench", False),
    "bf16res": (torch.bfloat16, True, False, "blocks", "bench", True),
    "step": (torch.bfloat16, True, False, "blocks", "train", False),
    "graph": (torch.bfloat16, True, False, "blocks", "graph", False),
    "graph-eager": (torch.bfloat16, True, False, "", "graph", False),
    "graph-bf16res": (torch.bfloat16, True, False, "blocks", "graph", True),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DiT-XL/2")
    p.add_argument("--latent_size", type=int, default=32, help="latent side (256 px / 8)")
    p.add_argument("--batch_sizes", default="32,128")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compile, autotune)")
    p.add_argument("--profile", default=None, help="print the top GPU kernels of this variant (at the last batch size)")
    p.add_argument("--time_cap", type=float, default=0, help="seconds: variants not started by then are skipped (0: no cap)")
    p.add_argument("--tiny", action="store_true", help="2-block model, 8x8 latents: a quick check of the script")
    return p.parse_args()


def matmul_peak_tflops(device: torch.device) -> float:
    """bf16 dense matmul throughput of this GPU at 8192^3, measured now."""
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    iters = 20
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12


class DiffusersDiT(nn.Module):
    """diffusers' DiTTransformer2DModel behind our model's call signature, at a registry model's size."""

    def __init__(self, reference: nn.Module):
        super().__init__()
        from diffusers import DiTTransformer2DModel

        heads = reference.num_heads
        self.net = DiTTransformer2DModel(
            num_attention_heads=heads,
            attention_head_dim=reference.hidden_size // heads,
            in_channels=reference.in_channels,
            out_channels=reference.out_channels,
            num_layers=len(reference.blocks),
            sample_size=reference.input_size,
            patch_size=reference.patch_size,
            num_embeds_ada_norm=reference.num_classes,
        )

    def forward(self, x, t, y):
        return self.net(x, timestep=t, class_labels=y, return_dict=False)[0].float()


def model_kwargs(args: argparse.Namespace) -> dict:
    return dict(input_size=args.latent_size, num_classes=1000, **({"depth": 2} if args.tiny else {}))


def build(name: str, args: argparse.Namespace, device: torch.device) -> nn.Module:
    model = DiT_models[args.model](**model_kwargs(args))
    if name == "diffusers":
        model = DiffusersDiT(model)
    model = model.to(device)
    _, flash, kernels, compiled, _, bf16_residual = VARIANTS[name]
    if kernels:
        enable_fused_adaln(model)
    if flash:
        enable_fast_attention(model)
    if bf16_residual:
        model.kernels.low_precision_residual = True
    if compiled == "blocks":
        compile_blocks(model)
    elif compiled == "model":
        model.compile()
    return model.train()


def make_train_step(model: nn.Module, dtype: torch.dtype, graph: bool):
    """train.py's TrainStep (optionally as a CUDA graph) on one process, behind the bench's step(x, y) signature."""
    params = [p for p in model.parameters() if p.requires_grad]
    cuda = next(model.parameters()).is_cuda
    opt = ShardedAdamW(params, lr=1e-4, weight_decay=0, fused=cuda, foreach=not cuda)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, partial(lr_factor, "constant", 0, 1))
    scaler = torch.amp.GradScaler("cuda" if cuda else "cpu", enabled=False)
    diffusion = create_diffusion(timestep_respacing="")
    train_step = TrainStep(model, diffusion, opt, scaler, scheduler, ShardedEMA(model), ParallelMesh(), dtype, dtype != torch.float32, 1.0, 0.9999)
    train_step = CudaGraphStep(train_step) if graph else train_step
    return lambda x, y: train_step(x, dict(y=y))


def make_step(model: nn.Module, dtype: torch.dtype, device: torch.device):
    """One training step, returning nothing (no host synchronisation inside)."""
    diffusion = create_diffusion(timestep_respacing="")
    params = [p for p in model.parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0, fused=device.type == "cuda")

    def step(x, y):
        t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = diffusion.training_losses(model, x, t, dict(y=y))["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - 0.9999)

    return step


def run(name: str, batch: int, args: argparse.Namespace, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = build(name, args, device)
    stepper = VARIANTS[name][4]
    step = make_step(model, VARIANTS[name][0], device) if stepper == "bench" else make_train_step(model, VARIANTS[name][0], stepper == "graph")
    x = torch.randn(batch, 4, args.latent_size, args.latent_size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    for _ in range(args.warmup):
        step(x, y)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step(x, y)
    sync()
    seconds = (time.perf_counter() - t0) / args.steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    if args.profile == name:
        profile(step, x, y)
    return dict(img_s=batch / seconds, ms=1000 * seconds, peak=peak)


KERNEL_KINDS = [  # profiler kernel names -> what they do (first match wins)
    ("attention", ("fmha", "cudnn", "flash", "attention")),
    ("optimizer / EMA / clip", ("multi_tensor", "fused_adam", "foreach", "lerp")),
    ("GEMM", ("gemm", "nvjet", "cutlass", "xmma", "sm90")),
    ("Triton (ours or inductor)", ("triton",)),
]


def profile(step, x, y) -> None:
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            step(x, y)
        torch.cuda.synchronize()
    events = prof.key_averages()
    print(events.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70))
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in kernels)
    shares = {}
    for e in kernels:
        name = e.key.lower()
        kind = next((k for k, words in KERNEL_KINDS if any(w in name for w in words)), "other")
        shares[kind] = shares.get(kind, 0) + e.self_device_time_total
    print("| kernel kind | GPU ms per step | share |\n|---|---:|---:|")
    for kind, us in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {us / 3e3:.1f} | {100 * us / total:.1f}% |")


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if args.tiny:
        args.latent_size, args.steps, args.warmup = 8, 2, 1
    peak = matmul_peak_tflops(device) if device.type == "cuda" else float("nan")
    with torch.device("meta"):
        flops = train_flops_per_sample(DiT_models[args.model](**model_kwargs(args)))
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{card}, torch {torch.__version__}; bf16 matmul peak {peak:.0f} TFLOP/s; {args.model} at latent {args.latent_size}: {flops / 1e9:.1f} GFLOP per training image\n")
    print("| variant | batch | img/s | ms/step | MFU | peak GiB |")
    print("|---|---:|---:|---:|---:|---:|")
    start = time.perf_counter()
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        for name in args.variants.split(","):
            if args.time_cap and time.perf_counter() - start > args.time_cap:
                print(f"| {name} | {batch} | skipped (time cap) | | | |", flush=True)
                continue
            try:
                r = run(name, batch, args, device)
            except torch.OutOfMemoryError:
                print(f"| {name} | {batch} | OOM | | | |", flush=True)
                torch.cuda.empty_cache()
                continue
            except Exception as e:  # a variant that cannot run here (e.g. a capture error) should not end the table
                traceback.print_exc()
                print(f"| {name} | {batch} | failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''} | | | |", flush=True)
                torch._dynamo.reset()
                continue
            mfu = r["img_s"] * flops / (peak * 1e12)
            print(f"| {name} | {batch} | {r['img_s']:.1f} | {r['ms']:.1f} | {100 * mfu:.1f}% | {r['peak']:.1f} |", flush=True)
            torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
