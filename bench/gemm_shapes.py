"""How close each of a DiT block's GEMMs runs to the card's matmul peak, as a markdown table.

    python bench/gemm_shapes.py [--model DiT-XL/2] [--batch_size 128] [--blas cublas,cublaslt]

A block's training step runs twelve GEMMs over its M = batch x tokens rows: the forward of qkv (with its bias), proj,
fc1 and fc2 (`x @ W.T`), and for each the input gradient (`dy @ W`) and the weight gradient (`dy.T @ x`), laid out as
autograd lays them out. Each is timed alone in a CUDA graph of 20 calls over two input sets (bf16, random normal);
"% peak" divides by an 8192^3 bf16 matmul timed the same way in the same run (sustained: lower than a short burst's
peak, as the card reaches its power limit); a library named twice is timed twice and its best time kept.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.timing import graphed_us  # noqa: E402
from opendit.models import DiT_models  # noqa: E402


def block_gemms(hidden: int, mlp: int, rows: int, device: torch.device):
    """(name, flops, fn) for each of one block's twelve GEMMs, on two input sets each."""
    bf16 = dict(device=device, dtype=torch.bfloat16)
    gemms = []
    for layer, d_in, d_out in (("qkv", hidden, 3 * hidden), ("proj", hidden, hidden), ("fc1", hidden, mlp), ("fc2", mlp, hidden)):
        w = torch.randn(d_out, d_in, **bf16) / d_in ** 0.5
        b = torch.randn(d_out, **bf16)
        xs = [torch.randn(rows, d_in, **bf16) for _ in range(2)]
        dys = [torch.randn(rows, d_out, **bf16) for _ in range(2)]
        flops = 2 * rows * d_in * d_out
        it = {"i": 0}

        def pick(pair, it=it):
            it["i"] ^= 1
            return pair[it["i"]]

        if layer == "qkv":
            fwd = lambda w=w, b=b, xs=xs, pick=pick: torch.addmm(b, pick(xs), w.t())  # noqa: E731
        else:
            fwd = lambda w=w, xs=xs, pick=pick: torch.mm(pick(xs), w.t())  # noqa: E731
        gemms += [
            (f"{layer} forward ({rows}x{d_in} @ {d_in}x{d_out})", flops, fwd),
            (f"{layer} input grad ({rows}x{d_out} @ {d_out}x{d_in})", flops, lambda w=w, dys=dys, pick=pick: torch.mm(pick(dys), w)),
            (f"{layer} weight grad ({d_out}x{rows} @ {rows}x{d_in})", flops,
             lambda xs=xs, dys=dys, it=it, pick=pick: torch.mm(pick(dys).t(), xs[it["i"]])),
        ]
    return gemms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DiT-XL/2")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--latent_size", type=int, default=32)
    p.add_argument("--blas", default="cublas,cublaslt", help="comma-separated torch.backends.cuda.preferred_blas_library values")
    args = p.parse_args()
    device = torch.device("cuda")
    model = DiT_models[args.model](input_size=8, num_classes=2)  # only its sizes are read
    hidden, depth = model.x_embedder.proj.out_channels, len(model.blocks)
    mlp = model.blocks[0].mlp.fc1.out_features
    tokens = (args.latent_size // model.patch_size) ** 2
    rows = args.batch_size * tokens
    del model
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {args.model}, batch {args.batch_size}, {tokens} tokens: "
          f"M = {rows}, hidden {hidden}, MLP {mlp}, depth {depth}")

    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    gemms = block_gemms(hidden, mlp, rows, device)
    blas_libs = args.blas.split(",")  # a library may repeat: its passes alternate with the others'
    results = {}
    peaks = {}
    for lib in blas_libs:
        torch.backends.cuda.preferred_blas_library(lib)
        peaks[lib] = max(peaks.get(lib, 0.0), 2 * 8192 ** 3 / graphed_us(lambda: torch.mm(a, b)) / 1e6)
        for name, flops, fn in gemms:
            results[(lib, name)] = min(results.get((lib, name), float("inf")), graphed_us(fn))
    blas_libs = list(dict.fromkeys(blas_libs))
    print()
    print("| GEMM | " + " | ".join(f"{lib}: us, TFLOP/s, % peak" for lib in blas_libs) + " |")
    print("|---|" + "---:|" * len(blas_libs))
    totals = dict.fromkeys(blas_libs, 0.0)
    for name, flops, _ in gemms:
        cells = []
        for lib in blas_libs:
            us = results[(lib, name)]
            totals[lib] += us
            cells.append(f"{us:.1f}, {flops / us / 1e6:.0f}, {100 * flops / us / 1e6 / peaks[lib]:.1f}%")
        print(f"| {name} | " + " | ".join(cells) + " |")
    flops_block = sum(f for _, f, _ in gemms)
    print("| **block** | " + " | ".join(f"**{totals[lib]:.1f}, {flops_block / totals[lib] / 1e6:.0f}, "
                                        f"{100 * flops_block / totals[lib] / 1e6 / peaks[lib]:.1f}%**" for lib in blas_libs) + " |")
    print()
    for lib in blas_libs:
        print(f"{lib}: 8192^3 peak {peaks[lib]:.0f} TFLOP/s; the blocks' GEMMs {depth * totals[lib] / 1000:.1f} ms a step")


if __name__ == "__main__":
    main()
