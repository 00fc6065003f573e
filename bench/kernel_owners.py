"""Which operation launches each GPU kernel of a training step, as a markdown table (kernels per step, us per call).

    python bench/kernel_owners.py [--model DiT-B/2] [--batch_size 64] [--variant step+kernels+bf16res] [--rows 60]

A CUDA-graph replay hides who launched what, so this profiles a variant of bench/train_step.py that is not graphed
(default: train.py's TrainStep, compiled, with our kernels and the bf16 residual stream: the graph step's kernels
before capture) and walks each kernel's launching CPU event up to the first three operations (a compiled graph's
kernels name their graph). `--tiny` checks the script on the CPU (no kernels are listed there).
"""
import argparse
import collections
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step  # noqa: E402  (bench/train_step.py: build, make_train_step, variant)


def owners(event, depth: int = 3) -> str:
    """The first `depth` operations above a CPU event (CUDA runtime calls skipped), innermost first."""
    names = []
    while event is not None and len(names) < depth:
        if not event.name.startswith("cu"):
            names.append(event.name[:50])
        event = event.cpu_parent
    return " < ".join(names)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DiT-B/2")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--variant", default="step+kernels+bf16res", help="a bench/train_step.py variant (not graph)")
    p.add_argument("--rows", type=int, default=60)
    p.add_argument("--tiny", action="store_true", help="2-block model, 8x8 latents, batch 2")
    args = p.parse_args()
    bench_args = argparse.Namespace(model=args.model, latent_size=8 if args.tiny else 32, tiny=args.tiny)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    v = train_step.variant(args.variant)
    if v.stepper == "graph":
        raise SystemExit(f"--variant {args.variant}: a CUDA-graph replay names no launching operations; take a non-graph variant")
    with train_step.knobs(v):
        model = train_step.build(args.variant, bench_args, device)
        step = train_step.make_step(model, v.dtype, device) if v.stepper == "bench" else train_step.make_train_step(model, v)
        batch = 2 if args.tiny else args.batch_size
        x = torch.randn(batch, 4, bench_args.latent_size, bench_args.latent_size, device=device)
        y = torch.randint(0, 1000, (batch,), device=device)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        for _ in range(6):  # compile and autotune first
            step(x, y)
        sync()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                step(x, y)
            sync()
    calls, micros = collections.Counter(), collections.Counter()
    for event in prof.events():
        for kernel in getattr(event, "kernels", None) or []:
            key = (kernel.name[:60], owners(event))
            calls[key] += 1
            micros[key] += kernel.duration
    print(f"{args.model}, batch {batch}, {args.variant}: {sum(calls.values()) / 2:.0f} kernels per step\n")
    print("| kernels per step | us per call | kernel | launched by (innermost first) |\n|---:|---:|---|---|")
    for key, n in sorted(calls.items(), key=lambda kv: -kv[1])[: args.rows]:
        print(f"| {n / 2:.0f} | {micros[key] / n:.1f} | {key[0]} | {key[1]} |")


if __name__ == "__main__":
    main()
