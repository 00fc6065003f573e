"""How wide our Triton kernels' global loads and stores are, from their PTX for Hopper, on any machine (no GPU needed).

    python bench/ptx_vectors.py [--json]

Compiles each kernel with `triton.compile` for sm90 at DiT-XL/2's shapes, with the divisibility that triton's launch
specializes (16-byte aligned pointers, sizes and strides that are multiples of 16), and counts its `ld.global` and
`st.global` instructions by width. A memory-bound kernel wants 16-byte vectors (`.v4.b32`) on its bf16 tiles; a
2-byte `.b16` load or store there moves a quarter as much per instruction (the first fused qkv kernel did, with column
blocks across heads). tests/kernels/test_ptx_vectors.py runs this script and holds the kernels to it.
"""

import argparse
import json
import os
import re
import sys
from collections import Counter

os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be JIT functions, not the interpreter's
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from opendit.kernels import _triton_ops as ops  # noqa: E402

gluon = ops._gluon  # the block boundary's Gluon kernels (None where triton has no Gluon)

BF16, F32 = "*bf16", "*fp32"
# kernel, its pointer arguments' types, its integer arguments' values (multiples of 16 get triton's divisibility),
# its constexprs: DiT-XL/2 at batch 128 (B N = 32768 tokens of width 1152, MLP width 4608, 16 heads of 72)
KERNELS = {
    "boundary fwd": (ops._gate_res_adaln_fwd_kernel, dict(X=BF16, GATE=BF16, Y=BF16, BIAS=BF16, OUT=BF16, H=BF16, SHIFT=BF16, SCALE=BF16, MEAN=F32, RSTD=F32),
                     dict(N=256, C=1152, gate_stride=195840, shift_stride=195840, scale_stride=195840), dict(BLOCK_M=4, BLOCK_C=2048, HAS_BIAS=True)),
    "boundary bwd": (ops._gate_res_adaln_bwd_kernel, dict(DOUT=BF16, DH=BF16, OUT=BF16, Y=BF16, BIAS=BF16, GATE=BF16, SCALE=BF16, MEAN=F32, RSTD=F32, DX=BF16,
                                                          DY=BF16, DSCALE_P=F32, DSHIFT_P=F32, DGATE_P=F32, DBIAS_P=F32),
                     dict(N=256, C=1152, gate_stride=195840, scale_stride=195840, rows_per_prog=128, T=2), dict(BLOCK_M=4, BLOCK_C=2048, HAS_BIAS=True)),
    "adaLN fwd": (ops._adaln_fwd_kernel, dict(X=BF16, Y=BF16, SHIFT=BF16, SCALE=BF16, MEAN=F32, RSTD=F32),
                  dict(N=256, C=1152, shift_stride=195840, scale_stride=195840), dict(BLOCK_M=4, BLOCK_C=2048, TILES=1, PREFETCH=False)),
    "adaLN bwd": (ops._adaln_bwd_kernel, dict(X=BF16, DY=BF16, DX=BF16, SCALE=BF16, MEAN=F32, RSTD=F32, DSCALE_P=F32, DSHIFT_P=F32),
                  dict(N=256, C=1152, scale_stride=195840, rows_per_prog=128, T=2), dict(BLOCK_M=4, BLOCK_C=2048, PREFETCH=True)),
    "bias + GELU fwd": (ops._bias_gelu_fwd_kernel, dict(H=BF16, BIAS=BF16, OUT=BF16), dict(N=32768, C=4608), dict(BLOCK_M=8, BLOCK_C=512)),
    "bias + GELU bwd": (ops._bias_gelu_bwd_kernel, dict(DOUT=BF16, H=BF16, BIAS=BF16, DH=BF16, DBIAS_P=F32), dict(N=32768, C=4608, rows_per_prog=64),
                        dict(BLOCK_M=8, BLOCK_C=512, PREFETCH=True)),
    "qkv gradient": (ops._qkv_grad_kernel, dict(DQ=BF16, DK=BF16, DV=BF16, DQKV=BF16, DBIAS_P=F32),
                     dict(N=256, C=1152, M=32768, s_b=294912, s_h_aligned=9, s_n=1152, rows_per_prog=96), dict(D=72, BLOCK_M=4, BLOCK_C=1024, BLOCK_T=128, ALIGN=8)),
    "GELU + float8 rows (sampling)": (ops._gelu_quantize_kernel, dict(H=BF16, Q="*fp8e4nv", SCALE=F32), dict(M=4096, K=4608),
                                      dict(BLOCK_M=1, BLOCK_K=4096, BLOCK_T=512)),
    **({} if gluon is None else {
        "boundary fwd (Gluon)": (gluon._boundary_fwd_kernel, dict(X=BF16, GATE=BF16, Y=BF16, BIAS=BF16, OUT=BF16, H=BF16, SHIFT=BF16, SCALE=BF16, MEAN=F32, RSTD=F32),
                                 dict(N=256, C=1152, gate_stride=195840, shift_stride=195840, scale_stride=195840),
                                 dict(BLOCK_M=gluon.FWD_BLOCK_M, BLOCK_C=1024, TW=128, W=4, HAS_BIAS=True)),
        "boundary bwd (Gluon)": (gluon._boundary_bwd_kernel, dict(DOUT=BF16, DH=BF16, OUT=BF16, Y=BF16, BIAS=BF16, GATE=BF16, SCALE=BF16, MEAN=F32, RSTD=F32,
                                                                   DX=BF16, DY=BF16, DSCALE_P=F32, DSHIFT_P=F32, DGATE_P=F32, DBIAS_P=F32),
                                 dict(N=256, C=1152, gate_stride=195840, scale_stride=195840, rows_per_prog=128, T=2),
                                 dict(BLOCK_M=gluon.BWD_BLOCK_M, BLOCK_C=1024, TW=128, W=4, HAS_BIAS=True)),
    }),
    "AdamW (one launch)": (ops._adamw_multi_kernel, dict(TABLE="*i64", BLOCKS="*i32", S=F32), {},
                           dict(G_DTYPE=ops.tl.bfloat16, BLOCK=1024, HAS_EMA=True, N_ALIGNED=True)),
}


def widths(kernel, pointers: dict, ints: dict, constexprs: dict) -> dict:
    """{'ld': Counter of load widths, 'st': Counter of store widths} in the kernel's sm90 PTX."""
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name], attrs[(i,)] = pointers[name], [["tt.divisibility", 16]]
        elif name in ints:
            signature[name] = "i32"
            if ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32"  # eps and the like
    if gluon is not None and kernel in (gluon._boundary_fwd_kernel, gluon._boundary_bwd_kernel):
        from triton.experimental.gluon._runtime import GluonASTSource  # Gluon's layouts name W warps: compile with W

        src, options = GluonASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs), dict(num_warps=constexprs["W"])
    else:
        src, options = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs), {}
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
    found = {op: re.findall(rf"\b{op}\.global((?:\.[\w:]+)+)", ptx) for op in ("ld", "st")}  # e.g. ".v4.b32", ".nc.b16"
    return {op: Counter(".".join(q for q in m.split(".") if re.fullmatch(r"v\d|[bsuf]\d+", q)) for m in ms) for op, ms in found.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print {kernel: {ld: {width: count}, st: {...}}} instead of a table")
    args = p.parse_args()
    result = {name: widths(*spec) for name, spec in KERNELS.items()}
    if args.json:
        print(json.dumps({k: {op: dict(c) for op, c in v.items()} for k, v in result.items()}))
        return
    print("| kernel (DiT-XL/2 shapes, sm90) | global loads | global stores |\n|---|---|---|")
    for name, v in result.items():
        print(f"| {name} | {', '.join(f'{n} x {w}' for w, n in sorted(v['ld'].items()))} | {', '.join(f'{n} x {w}' for w, n in sorted(v['st'].items()))} |")


if __name__ == "__main__":
    main()
