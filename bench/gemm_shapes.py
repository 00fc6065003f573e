"""How close each of a DiT block's GEMMs runs to the card's matmul peak, as a markdown table.

    python bench/gemm_shapes.py [--model DiT-XL/2] [--batch_size 128] [--blas cublas,cublaslt,quack]

A block's training step runs twelve GEMMs over its M = batch x tokens rows: the forward of qkv (with its bias), proj,
fc1 and fc2 (`x @ W.T`), and for each the input gradient (`dy @ W`) and the weight gradient (`dy.T @ x`), laid out as
autograd lays them out. Each is timed alone in a CUDA graph of 20 calls over two input sets (bf16, random normal);
"% peak" divides by an 8192^3 bf16 matmul timed the same way in the same run (sustained: lower than a short burst's
peak, as the card reaches its power limit); a library named twice is timed twice and its best time kept. `quack` runs
every GEMM (and the 8192^3 product) as quack-kernels' CuTe-DSL GEMM with its default Hopper config (needs quack).
"""

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.timing import graphed_us  # noqa: E402
from opendit.models import DiT_models  # noqa: E402


def alternate(pair: list):
    """A function that returns the pair's tensors in turn (two input sets: no call reads what the last left in L2)."""
    turn = itertools.cycle(pair)
    return lambda: next(turn)


def blas_mm(a: torch.Tensor, b: torch.Tensor, bias=None) -> torch.Tensor:
    """a @ b (+ bias) through torch (cuBLAS or cuBLASLt, as preferred_blas_library says)."""
    return torch.mm(a, b) if bias is None else torch.addmm(bias, a, b)


def quack_mm(a: torch.Tensor, b: torch.Tensor, bias=None) -> torch.Tensor:
    """a @ b (+ bias) as quack's GEMM, its default config (no autotuning)."""
    from quack.gemm_interface import gemm

    from opendit.kernels.quack_mlp import _compat

    _compat()
    return gemm(a, b, bias=bias, tuned=False)


MM = {"quack": quack_mm}


def layer_gemms(layer: str, d_in: int, d_out: int, rows: int, bias: bool, device: torch.device, mm=blas_mm) -> list:
    """(name, flops, fn) for one linear layer's forward, input gradient and weight gradient."""
    bf16 = dict(device=device, dtype=torch.bfloat16)
    w = torch.randn(d_out, d_in, **bf16) / d_in ** 0.5
    b = torch.randn(d_out, **bf16)
    x = alternate([torch.randn(rows, d_in, **bf16) for _ in range(2)])
    dy = alternate([torch.randn(rows, d_out, **bf16) for _ in range(2)])
    flops = 2 * rows * d_in * d_out
    return [
        (f"{layer} forward ({rows}x{d_in} @ {d_in}x{d_out})", flops, lambda: mm(x(), w.t(), b if bias else None)),
        (f"{layer} input grad ({rows}x{d_out} @ {d_out}x{d_in})", flops, lambda: mm(dy(), w)),
        (f"{layer} weight grad ({d_out}x{rows} @ {rows}x{d_in})", flops, lambda: mm(dy().t(), x())),
    ]


def block_gemms(hidden: int, mlp: int, rows: int, device: torch.device, mm=blas_mm) -> list:
    """(name, flops, fn) for each of one block's twelve GEMMs (qkv's forward with its bias, as in the model)."""
    layers = (("qkv", hidden, 3 * hidden), ("proj", hidden, hidden), ("fc1", hidden, mlp), ("fc2", mlp, hidden))
    return [g for layer, d_in, d_out in layers for g in layer_gemms(layer, d_in, d_out, rows, layer == "qkv", device, mm)]


def shape_parser(doc: str) -> argparse.ArgumentParser:
    """A parser with the shape's flags: --model, --batch_size, --latent_size (M = batch x tokens)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DiT-XL/2")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--latent_size", type=int, default=32)
    return p


def main() -> None:
    p = shape_parser(__doc__)
    p.add_argument("--blas", default="cublas,cublaslt", help="comma-separated torch.backends.cuda.preferred_blas_library values")
    args = p.parse_args()
    device = torch.device("cuda")
    with torch.device("meta"):  # only its sizes are read
        model = DiT_models[args.model](input_size=8, num_classes=2)
    hidden, depth = model.x_embedder.proj.out_channels, len(model.blocks)
    mlp = model.blocks[0].mlp.fc1.out_features
    tokens = (args.latent_size // model.patch_size) ** 2
    rows = args.batch_size * tokens
    del model
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {args.model}, batch {args.batch_size}, {tokens} tokens: "
          f"M = {rows}, hidden {hidden}, MLP {mlp}, depth {depth}")

    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    blas_libs = args.blas.split(",")  # a library may repeat: its passes alternate with the others'
    results = {}
    peaks = {}
    made = {}  # each library's GEMMs, made once
    for lib in blas_libs:
        mm = MM.get(lib, blas_mm)
        if lib not in MM:
            torch.backends.cuda.preferred_blas_library(lib)
        if lib not in made:
            made[lib] = block_gemms(hidden, mlp, rows, device, mm)
        gemms = made[lib]
        peaks[lib] = max(peaks.get(lib, 0.0), 2 * 8192 ** 3 / graphed_us(lambda: mm(a, b)) / 1e6)
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
