"""The block boundary's kernels: Gluon's two-tile rows (the default on CUDA) against the autotuned Triton kernels.

    python bench/boundary_gluon.py [--shapes 128x256x1152,64x256x768]

Forward (gate + residual, then LayerNorm + modulate) and backward (with the per-program partials) at each B x N x C, bf16,
with a bias. Gluon at each rows-per-loop-step (BLOCK_M) and, backward, at its own rows per program
(`boundary_bwd_rows`) and at Triton's (`bwd_rows_per_program`); Triton autotuned at both. GB/s counts each bf16 tensor
once (forward 4 of B N C, backward 6). Prints a check of both against each other first (max abs difference).
"""

import argparse
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kernels import gpu_time_us  # noqa: E402 (bench/kernels.py)
from opendit.kernels import _triton_ops as ops  # noqa: E402

SHAPES = "128x256x1152,64x256x768,256x256x768,128x256x1024,256x256x384,64x256x384"


def inputs(B: int, N: int, C: int, dtype=torch.bfloat16):
    """x, gate, y, shift, scale, bias, dout, dh as the block passes them (modulation rows as strided views of one GEMM)."""
    x, y, dout, dh = (torch.randn(B, N, C, device="cuda", dtype=dtype) for _ in range(4))
    mod = torch.randn(B, 6 * C, device="cuda", dtype=dtype)
    return x, mod[:, 2 * C:3 * C], y, mod[:, :C], mod[:, C:2 * C], torch.randn(C, device="cuda", dtype=dtype), dout, dh


def fwd(s, gluon: bool):
    ops.GLUON = gluon
    x, gate, y, shift, scale, bias, _, _ = s
    return ops.gate_res_adaln_fwd(x, gate, y, shift, scale, 1e-6, x.dtype, bias=bias)


def bwd(s, st, rows: int, gluon: bool):
    ops.GLUON = gluon
    x, gate, y, shift, scale, bias, dout, dh = s
    out, _, mean, rstd = st
    return ops.gate_res_adaln_bwd_partials(dout, dh, out, y, gate, scale, mean, rstd, x.dtype, rows_per_prog=rows, bias=bias)


def check() -> None:
    for C in (1152, 768, 384):
        for dtype in (torch.float32, torch.bfloat16):
            s = inputs(3, 37, C, dtype)
            ref, got = fwd(s, False), fwd(s, True)
            ref_b, got_b = bwd(s, ref, 16, False), bwd(s, ref, 16, True)
            errs = [(a.float() - r.float()).abs().max().item() for a, r in zip(got + got_b, ref + ref_b)]
            print(f"check 3x37x{C} {dtype}: Gluon - Triton, max abs: out, h, mean, rstd, dx, dy, partials {['%.1e' % e for e in errs]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=SHAPES, help="comma-separated BxNxC")
    args = p.parse_args()
    gluon = ops._gluon
    print(f"{torch.cuda.get_device_name()}, triton {triton.__version__}, Gluon {'on' if ops.GLUON else 'off'} by default\n")
    check()
    print("\n| B x N x C | kernel | BLOCK_M | rows per program | us | GB/s |\n|---|---|---:|---:|---:|---:|")
    dev = torch.device("cuda")
    for shape in args.shapes.split(","):
        B, N, C = (int(v) for v in shape.split("x"))
        sets = [inputs(B, N, C) for _ in range(3)]
        stats = [fwd(s, False) for s in sets]

        def row(kind, bm, rows, calls, tensors):
            t = gpu_time_us(calls)
            print(f"| {shape} | {kind} | {bm} | {rows} | {t:.1f} | {tensors * 2 * B * N * C / t / 1e3:.0f} |", flush=True)

        row("fwd Triton", "tuned", "", [lambda s=s: fwd(s, False) for s in sets], 4)
        if gluon.split(C):
            for bm in (1, 2, 4):
                gluon.FWD_BLOCK_M = bm
                row("fwd Gluon", bm, "", [lambda s=s: fwd(s, True) for s in sets], 4)
        ops.GLUON = True
        gluon_rows, triton_rows = ops.boundary_bwd_rows(B, N, C, dev), ops.bwd_rows_per_program(B, N, dev)
        for rows in sorted({gluon_rows, triton_rows}):
            row("bwd Triton", "tuned", rows, [lambda s=s, st=st, r=rows: bwd(s, st, r, False) for s, st in zip(sets, stats)], 6)
            if gluon.split(C):
                for bm in (2, 4):
                    gluon.BWD_BLOCK_M = bm
                    row("bwd Gluon", bm, rows, [lambda s=s, st=st, r=rows: bwd(s, st, r, True) for s, st in zip(sets, stats)], 6)
        del sets, stats
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
