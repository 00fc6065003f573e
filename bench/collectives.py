"""NCCL bandwidth at the message sizes DiT-XL/2 training sends, and how much of it hides behind a GEMM.

    torchrun --standalone --nproc_per_node N bench/collectives.py [--iters 20]
    torchrun --standalone --nproc_per_node 2 bench/collectives.py --tiny      # CPU + gloo smoke check

Rows (every time is the slowest rank's mean over --iters after warm-up):

    all_gather bf16 block     what FSDP2 gathers per DiT-XL block (23.9M parameters in bf16)
    reduce_scatter fp32 block what FSDP2 reduces per block (fp32 gradients)
    all_reduce fp32 bucket    a DDP bucket (25 MiB) and the whole DiT-XL/2 gradient (675M fp32) in one call
    zero2 step comm           28 block all-gathers + 28 block reduce-scatters back to back: the floor of a zero2 step

algbw = bytes of the full (gathered / unreduced) tensor / time; busbw follows nccl-tests (x (N-1)/N, all-reduce
x 2(N-1)/N). The overlap rows run the zero2 step's collectives on a side stream while the default stream runs bf16
GEMMs, as FSDP2 does: slowdown = how much longer the GEMMs take than alone (NCCL takes SMs and memory bandwidth).
"""
import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from opendit.parallel.process import cleanup, setup_distributed  # noqa: E402
from timing import timed  # noqa: E402  (bench/timing.py)

BLOCK_PARAMS = 23_905_152  # one DiT-XL block: attention (qkv + proj), MLP (4x) and adaLN (1152 -> 6 x 1152)
MODEL_PARAMS = 675_129_632
BLOCKS = 28


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--tiny", action="store_true", help="1/1000 of the sizes, on CPU with gloo")
    args = p.parse_args()
    info = setup_distributed("cpu" if args.tiny else "auto")
    WORLD = dist.group.WORLD
    device, n = info.device, info.world_size
    if n < 2:
        raise SystemExit("run under torchrun with --nproc_per_node >= 2")
    scale = 1000 if args.tiny else 1
    block, model, bucket = BLOCK_PARAMS // scale // n * n, MODEL_PARAMS // scale // n * n, 25 * 2**20 // 4 // scale // n * n
    gathered = torch.empty(block, dtype=torch.bfloat16, device=device)
    shard = torch.randn(block // n, device=device).to(torch.bfloat16)
    grads = torch.randn(block, device=device)
    reduced = torch.empty(block // n, device=device)
    bucket_t, model_t = torch.randn(bucket, device=device), torch.randn(model, device=device)

    def gather():
        dist.all_gather_into_tensor(gathered, shard)

    def scatter():
        dist.reduce_scatter_tensor(reduced, grads)

    def step_comm():
        for _ in range(BLOCKS):
            gather()
        for _ in range(BLOCKS):
            scatter()

    rows = [
        ("all_gather bf16 block", gathered.numel() * 2, timed(gather, args.iters, device, WORLD), (n - 1) / n),
        ("reduce_scatter fp32 block", grads.numel() * 4, timed(scatter, args.iters, device, WORLD), (n - 1) / n),
        ("all_reduce fp32 25 MiB bucket", bucket * 4, timed(lambda: dist.all_reduce(bucket_t), args.iters, device, WORLD), 2 * (n - 1) / n),
        ("all_reduce fp32 whole model", model * 4, timed(lambda: dist.all_reduce(model_t), max(2, args.iters // 5), device, WORLD), 2 * (n - 1) / n),
        ("zero2 step comm (28 AG + 28 RS)", BLOCKS * (gathered.numel() * 2 + grads.numel() * 4), timed(step_comm, max(2, args.iters // 5), device, WORLD), (n - 1) / n),
    ]
    overlap = []
    if device.type == "cuda":
        a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        side = torch.cuda.Stream(device)

        def gemms():
            for _ in range(40):
                a @ a

        def both():
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                step_comm()
            gemms()
            torch.cuda.current_stream(device).wait_stream(side)

        alone, comm, together = timed(gemms, 3, device, WORLD), rows[-1][2], timed(both, 3, device, WORLD)
        overlap = [("GEMMs alone", alone), ("zero2 step comm alone", comm), ("GEMMs + comm on a side stream", together)]
        overlap.append(("hidden comm", 1 - (together - alone) / comm))
    if info.is_main:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(f"\n{n} x {name}{' (tiny sizes)' if args.tiny else ''}\n")
        print("| collective | MB | ms | algbw GB/s | busbw GB/s |\n|---|---|---|---|---|")
        for what, nbytes, seconds, factor in rows:
            print(f"| {what} | {nbytes / 1e6:.1f} | {seconds * 1e3:.3f} | {nbytes / seconds / 1e9:.1f} | {nbytes * factor / seconds / 1e9:.1f} |")
        if overlap:
            print("\n| overlap (GEMMs: 40 x bf16 8192^3) | ms |\n|---|---|")
            for what, value in overlap[:-1]:
                print(f"| {what} | {value * 1e3:.2f} |")
            print(f"| hidden | {100 * overlap[-1][1]:.0f}% of the comm |")
    cleanup()


if __name__ == "__main__":
    main()
