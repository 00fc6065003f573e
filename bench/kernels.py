"""GPU benchmark of the fused Triton kernels vs eager PyTorch and torch.compile, as markdown tables.

    python bench/kernels.py [--shapes 256x256x1152,32x256x1152] [--dtype bf16] [--ops adaln,gate,gelu]

boundary is the block boundary's backward (gate + residual, then LayerNorm + modulate: `gate_res_adaln_bwd`) alone:
the default (Gluon's kernel where the width splits, else Triton autotuned), then the Triton kernel for each
rows-per-program and launch config (C being the model's width); bench/boundary_gluon.py compares the two kernels.
gelu is fc1's bias + tanh GELU (training), C being the MLP's hidden width (3072 for DiT-B, 4608 for DiT-XL); its
section also times the backward at several programs per SM (the rows each program sums the bias gradient over).

GPU time: the kernels' device time summed by torch.profiler, per call, cycling over enough input sets that they do
not fit in L2 (no launch gaps, no cache reuse). fwd+bwd is `torch.autograd.grad(f(*inputs), inputs, dout)`.
"host µs" is a plain Python loop of fwd+bwd calls (median over iterations, synchronised): it includes launch
and autograd overhead, which dominates small shapes when the CPU is slow.
GB/s counts the fewest bytes each op must move (every input read once, every output written once), the same
count for every implementation; "% copy" compares with `dst.copy_(src)` on the same shape, measured the same way.
"""

import argparse
import math
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

DEFAULT_SHAPES = "256x256x1152,32x256x1152,4x4096x1152,2x16384x1152"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated BxNxC")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--ops", default="adaln,gate", help="comma-separated subset of adaln,gate,gelu,boundary")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    return p.parse_args()


def gpu_time_us(calls, iters: int = 4) -> float:
    """GPU time of one call: summed kernel times (profiler) over `iters` passes over `calls`, per call."""
    for call in calls:  # warm-up: autotune, compile
        call()
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(iters):
            for call in calls:
                call()
        torch.cuda.synchronize()
    total = sum(getattr(e, "self_device_time_total", 0) or 0 for e in prof.key_averages())
    return total / (iters * len(calls))


def host_time_us(call, iters: int = 30) -> float:
    """Median wall time of call() + synchronize in a Python loop (launch and autograd overhead included)."""
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        call()
        torch.cuda.synchronize()
        times.append(1e6 * (time.perf_counter() - t0))
    return statistics.median(times)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def adaln_case(B, N, C, dtype):
    """Inputs like DiT's: shift/scale are chunks of a (B, 6C) adaLN projection -> (names, inputs)."""
    x = torch.randn(B, N, C, device="cuda", dtype=dtype, requires_grad=True)
    mod = torch.randn(B, 6 * C, device="cuda", dtype=dtype, requires_grad=True)
    shift, scale = mod.chunk(6, dim=1)[:2]
    return ("x", "shift", "scale"), (x, shift, scale)


def adaln_bytes(B, N, C, s):
    """(fwd, fwd+bwd) bytes: fwd reads x, shift, scale, writes y; bwd reads dy, x, scale, writes dx, dshift, dscale."""
    fwd = s * (2 * B * N * C + 2 * B * C)
    return fwd, fwd + s * (3 * B * N * C + 3 * B * C)


def gate_case(B, N, C, dtype):
    """Residual stream x, branch output y, gate chunk of a (B, 6C) projection -> (names, inputs)."""
    x = torch.randn(B, N, C, device="cuda", dtype=dtype, requires_grad=True)
    y = torch.randn(B, N, C, device="cuda", dtype=dtype, requires_grad=True)
    mod = torch.randn(B, 6 * C, device="cuda", dtype=dtype, requires_grad=True)
    return ("x", "gate", "y"), (x, mod.chunk(6, dim=1)[2], y)


def gate_bytes(B, N, C, s):
    """(fwd, fwd+bwd) bytes: fwd reads x, y, gate, writes out; bwd reads dout, y, writes dy, dgate (dx is dout)."""
    fwd = s * (3 * B * N * C + B * C)
    return fwd, 2 * fwd


def gelu_case(B, N, C, dtype):
    """fc1's output without its bias (B, N, C) and the bias (C,) in fp32, as the model holds it -> (names, inputs)."""
    h = torch.randn(B, N, C, device="cuda", dtype=dtype, requires_grad=True)
    return ("h", "bias"), (h, torch.randn(C, device="cuda", requires_grad=True))


def gelu_bytes(B, N, C, s):
    """(fwd, fwd+bwd) bytes: fwd reads h, writes out; bwd reads dout, h, writes dh (the bias is negligible)."""
    return 2 * s * B * N * C, 5 * s * B * N * C


def gelu_sweep(shapes, dtype) -> None:
    """The backward alone at several programs per SM (its default: gelu_bwd_programs_per_sm)."""
    from opendit.kernels import _triton_ops as ops

    print("| B x N x C | programs per SM | rows per program | bwd µs | GB/s |\n|---|---:|---:|---:|---:|")
    for B, N, C in shapes:
        rows, s = B * N, torch.empty((), dtype=dtype).element_size()
        sets = [(torch.randn(rows, C, device="cuda", dtype=dtype), torch.randn(rows, C, device="cuda", dtype=dtype)) for _ in range(3)]
        bias = torch.randn(C, device="cuda")
        n_cblocks = ops.triton.cdiv(C, ops._gelu_block_c(C))
        for per_sm in (2, 4, 8, 16, 32):
            rp = ops.bwd_rows_per_program(n_cblocks, rows, torch.device("cuda", 0), per_sm)
            t = gpu_time_us([lambda d=d, h=h: ops.bias_gelu_bwd(d, h, bias, rows_per_prog=rp) for d, h in sets])
            print(f"| {B}x{N}x{C} | {per_sm} | {rp} | {t:.1f} | {3 * s * rows * C / t / 1e3:.0f} |")
    print(flush=True)


def boundary_sweep(shapes, dtype) -> None:
    """The block boundary's backward alone, for each rows per program x (BLOCK_M, num_warps); the default marked."""
    from opendit.kernels import _triton_ops as ops

    dev = torch.device("cuda", 0)
    print("| B x N x C | rows per program | programs | BLOCK_M | warps | bwd µs | GB/s | default |\n|---|---:|---:|---:|---:|---:|---:|---|")
    for B, N, C in shapes:
        s = torch.empty((), dtype=dtype).element_size()

        def make():
            t = [torch.randn(B, N, C, device="cuda", dtype=dtype) for _ in range(4)]  # dout, dh, out, y
            mod = torch.randn(B, 6 * C, device="cuda", dtype=dtype)
            stats = torch.randn(B * N, device="cuda"), torch.rand(B * N, device="cuda") + 0.5
            return (*t, mod[:, 2 * C:3 * C], mod[:, C:2 * C], *stats)

        sets = [make() for _ in range(3)]
        moved = 6 * s * B * N * C  # reads dout, dh, out, y; writes dx, dy
        default_rp = ops.boundary_bwd_rows(B, N, C, dev)
        bc = ops.triton.next_power_of_2(C)
        t = gpu_time_us([lambda a=a: ops.gate_res_adaln_bwd_partials(*a, dtype) for a in sets])
        default = "Gluon (default)" if ops._gluon_tiles(C, dev) else "autotuned"
        print(f"| {B}x{N}x{C} | {default_rp} | {B * ops.triton.cdiv(N, default_rp)} | {default} | | {t:.1f} | {moved / t / 1e3:.0f} | rows |", flush=True)
        for rp in sorted({32, 64, 128, default_rp}):
            if rp > N:
                continue
            for bm in (1, 2, 4, 8):
                for w in (4, 8, 16):
                    if not 4 <= bm * bc // (32 * w) <= 128:
                        continue
                    cfg = dict(BLOCK_M=bm, num_warps=w)
                    calls = [lambda a=a: ops.gate_res_adaln_bwd_partials(*a, dtype, config=cfg, rows_per_prog=rp) for a in sets]
                    t = gpu_time_us(calls)
                    mark = "rows" if rp == default_rp else ""
                    print(f"| {B}x{N}x{C} | {rp} | {B * ops.triton.cdiv(N, rp)} | {bm} | {w} | {t:.1f} | {moved / t / 1e3:.0f} | {mark} |", flush=True)
        del sets
        torch.cuda.empty_cache()
    print(flush=True)


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/kernels.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured.")
    import triton

    from opendit.kernels import fused_adaln as fa
    from opendit.kernels import fused_gelu as fg

    torch._dynamo.config.cache_size_limit = 64
    warnings.filterwarnings("ignore", message=".*Profiler clears events.*")
    dtype = DTYPES[args.dtype]
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",") if s]
    ops = {
        "adaln": ("LayerNorm + modulate", adaln_case, adaln_bytes, fa.fused_layernorm_modulate, fa.layernorm_modulate_ref),
        "gate": ("gate + residual", gate_case, gate_bytes, fa.gate_residual, fa.gate_residual_ref),
        "gelu": ("bias + GELU", gelu_case, gelu_bytes, fg.bias_gelu, fg.bias_gelu_ref),
    }
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 64 << 20)
    print(f"device: {props.name} ({props.multi_processor_count} SMs, L2 {l2 >> 20} MiB), torch {torch.__version__}, "
          f"triton {triton.__version__}, dtype {args.dtype}, autotune {'on' if fa._ops.AUTOTUNE else 'off'}\n")

    for op in [o for o in args.ops.split(",") if o]:
        if op == "boundary":
            boundary_sweep(shapes, dtype)
            continue
        title, make_case, count_bytes, fused, ref = ops[op]
        impls = {"fused (triton)": fused, "eager": ref}
        if not args.no_compile:
            impls["torch.compile"] = torch.compile(ref, dynamic=False)
        rows, checks = [], []
        for B, N, C in shapes:
            torch.manual_seed(0)
            s = torch.empty((), dtype=dtype).element_size()
            fwd_bytes, fb_bytes = count_bytes(B, N, C, s)
            n_sets = max(2, math.ceil(3 * l2 / fwd_bytes))  # input sets cycled so that none is still in L2
            cases = [make_case(B, N, C, dtype) for _ in range(n_sets)]
            names = cases[0][0]
            douts = [torch.randn(B, N, C, device="cuda", dtype=dtype) for _ in range(n_sets)]

            pairs = [(d, torch.empty_like(d)) for d in douts]
            t_copy = gpu_time_us([lambda a=a, b=b: b.copy_(a) for a, b in pairs])
            copy_gbs = 2 * B * N * C * s / t_copy / 1e3
            rows.append(f"| {B}x{N}x{C} | copy (reference) | {t_copy:.1f} | {copy_gbs:.0f} | 100% | | | | |")
            del pairs

            # Correctness vs the fp32 reference (inputs upcast to fp32): output and every input's gradient.
            inputs, dout = cases[0][1], douts[0]
            ref_in = [t.detach().float().requires_grad_() for t in inputs]
            ref_out = ref(*ref_in)
            ref_grads = torch.autograd.grad(ref_out, ref_in, dout.float())
            errs = []
            for name, f in impls.items():
                out = f(*inputs)
                grads = torch.autograd.grad(out, inputs, dout)
                e = ", ".join(f"d{n} {max_err(g, r):.1e}" for n, g, r in zip(names, grads, ref_grads))
                errs.append(f"{name}: out {max_err(out, ref_out):.1e}, {e}")
            checks.append(f"- {B}x{N}x{C}: max abs error vs fp32 reference: " + "; ".join(errs))
            del ref_in, ref_out, ref_grads, out, grads

            for name, f in impls.items():
                with torch.no_grad():
                    t_fwd = gpu_time_us([lambda f=f, c=c: f(*c[1]) for c in cases])
                # autograd.grad w.r.t. the op's inputs (the chunk backward of the (B, 6C) projection is not timed)
                fb = [lambda f=f, c=c, d=d: torch.autograd.grad(f(*c[1]), c[1], d) for c, d in zip(cases, douts)]
                t_fb = gpu_time_us(fb)
                t_host = host_time_us(fb[0])
                gbs_fwd, gbs_fb = fwd_bytes / t_fwd / 1e3, fb_bytes / t_fb / 1e3
                rows.append(
                    f"| {B}x{N}x{C} | {name} | {t_fwd:.1f} | {gbs_fwd:.0f} | {100 * gbs_fwd / copy_gbs:.0f}% "
                    f"| {t_fb:.1f} | {gbs_fb:.0f} | {100 * gbs_fb / copy_gbs:.0f}% | {t_host:.0f} |"
                )
            del cases, douts, inputs, dout
            torch.cuda.empty_cache()

        print(f"### {title} ({args.dtype})\n")
        print("| B x N x C | impl | fwd µs | fwd GB/s | fwd % copy | fwd+bwd µs | fwd+bwd GB/s | fwd+bwd % copy "
              "| fwd+bwd host µs |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        print("\n".join(rows))
        print("\nCorrectness:\n" + "\n".join(checks) + "\n", flush=True)
        if op == "gelu":
            gelu_sweep(shapes, dtype)


if __name__ == "__main__":
    main()
