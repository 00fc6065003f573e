"""Float8 GEMMs against bf16 at DiT-XL/2's block shapes, one GPU, as a markdown table.

    python bench/float8.py [--rows 4096,32768]

For each of a block's four GEMMs (qkv, proj, fc1, fc2; width 1152) and each token count M (4096: 8 images + CFG at 256
px; 32768: sample_ddp.py's batch 64 + CFG): bf16 F.linear with bias, torch._scaled_mm in float8 e4m3 with per-row /
per-channel scales (what Float8Linear runs), with one scale per tensor, each with and without fast accumulation; then
the activation's quantization alone (compiled), per row and per tensor. Then fc2's input: fc1's output (M, 4608) through
tanh-GELU and quantized per row, as the Triton pass of opendit.kernels.float8 (at each config it autotunes over, and
autotuned), as torch.compile makes it, and eagerly, each timed inside a CUDA graph (GPU time, no launch cost); with the
bytes it moves over the time (GB/s). Microseconds per call from CUDA events.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from opendit.kernels import _triton_ops  # noqa: E402
from opendit.kernels.float8 import E4M3, E4M3_MAX, gelu_quantize_rows_ref, quantize_rows  # noqa: E402
from timing import graphed_us, timed_us  # noqa: E402  (bench/timing.py)

SHAPES = {"qkv": (1152, 3456), "proj": (1152, 1152), "fc1": (1152, 4608), "fc2": (4608, 1152)}  # (K, N)


def quantize_tensor(x):
    """quantize_rows with one scale for the whole tensor."""
    scale = x.abs().amax().float().clamp(min=1e-12) / E4M3_MAX
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=str, default="4096,32768")
    parser.add_argument("--sections", type=str, default="gemm,gelu", help="comma-separated: gemm, gelu")
    opts = parser.parse_args()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    sections = set(opts.sections.split(","))
    if "gemm" in sections:
        gemms(opts)
    if "gelu" in sections:
        gelu_quantize_rows(opts)


def gemms(opts) -> None:
    print("| GEMM | M | bf16 us | fp8 row us | fp8 row fast-acc us | fp8 tensor us | fp8 tensor fast-acc us | quantize row us | quantize tensor us | best fp8 / bf16 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    q_row, q_tensor = torch.compile(quantize_rows), torch.compile(quantize_tensor)
    for M in [int(m) for m in opts.rows.split(",")]:
        for name, (K, N) in SHAPES.items():
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
            b = torch.randn(N, device="cuda", dtype=torch.bfloat16)
            xr, sxr = quantize_rows(x)
            wr, swr = quantize_rows(w)
            xt, sxt = quantize_tensor(x)
            wt, swt = quantize_tensor(w)
            swr = swr.t().contiguous()
            times = [timed_us(lambda: F.linear(x, w, b))]
            for fast in (False, True):
                times.append(timed_us(lambda: torch._scaled_mm(xr, wr.t(), scale_a=sxr, scale_b=swr, out_dtype=torch.bfloat16, bias=b, use_fast_accum=fast)))
            for fast in (False, True):
                times.append(timed_us(lambda: torch._scaled_mm(xt, wt.t(), scale_a=sxt, scale_b=swt, out_dtype=torch.bfloat16, bias=b, use_fast_accum=fast)))
            times += [timed_us(lambda: q_row(x)), timed_us(lambda: q_tensor(x))]
            print(f"| {name} | {M} | " + " | ".join(f"{t:.1f}" for t in times) + f" | {min(times[1:5]) / times[0]:.2f} |", flush=True)


def gelu_quantize_rows(opts) -> None:
    print("\n| GELU + row quantize of (M, 4608) bf16 | M | us | GB/s (read bf16 + write e4m3) |\n|---|---:|---:|---:|")
    ref = torch.compile(gelu_quantize_rows_ref)
    for M in [int(m) for m in opts.rows.split(",")]:
        h = torch.randn(M, 4608, device="cuda", dtype=torch.bfloat16)
        ways = {}
        for c in _triton_ops.GELU_CONFIGS:
            name = f"Triton, {c['BLOCK_M']} row(s) x {c['num_warps']} warps a program"
            ways[name] = lambda c=c, h=h: _triton_ops.gelu_quantize(h, config=c)
        ways["Triton, autotuned (the launcher's default)"] = lambda h=h: _triton_ops.gelu_quantize(h)
        ways["torch.compile of the reference"] = lambda h=h: ref(h)
        ways["eager reference"] = lambda h=h: gelu_quantize_rows_ref(h)
        for name, fn in ways.items():
            try:
                us = graphed_us(fn)
            except Exception as e:  # report and go on
                print(f"| {name} | {M} | failed: {type(e).__name__}: {str(e)[:150]} | |", flush=True)
                continue
            print(f"| {name} | {M} | {us:.1f} | {h.numel() * 3 / us / 1e3:.0f} |", flush=True)


if __name__ == "__main__":
    main()
