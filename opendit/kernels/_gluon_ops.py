"""Gluon kernels for the block boundary (gate + residual, then LayerNorm + modulate): forward and backward.

Gluon is triton's language with explicit layouts. A row of C = BLOCK_C + TW columns (1152 = 1024 + 128, 768 = 512 + 256)
is two tiles whose layouts both keep every row of the tile inside each thread and spread the columns over all the
program's warps: the main tile in 16-byte vectors, the tail in TW / (32 W) columns per thread. The row sums of the
two tiles then meet without moving data. Plain Triton gives its one power-of-two tile (2048 for 1152, 44% masked) or
converts whole tiles through shared memory when asked for two (docs/benchmarks.md, fifteenth and sixteenth rounds).

Imported by `_triton_ops`, which calls these launchers on CUDA for the widths `split` accepts and keeps its Triton
kernels for the rest, the CPU interpreter and explicit configs. Same arguments, outputs and maths as
`_gate_res_adaln_fwd_kernel` / `_gate_res_adaln_bwd_kernel` there.
"""

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

FWD_BLOCK_M = 2  # rows per forward program: measured best of 1-8 on an H200 at DiT-B/2 and DiT-XL/2 widths
BWD_BLOCK_M = 4  # rows per backward loop step: measured best of 1-4 (registers: 243 at 1152 wide, no spill)
WARPS_PER_SM = 8  # the backward's rows per program aim at this many warps per SM (B/2's 2-warp programs: 32 rows, not 64)


def split(C: int) -> tuple[int, int, int] | None:
    """(BLOCK_C, TW, warps) for a row of C: the largest power of two below C, a smaller power-of-two tail that completes
    the row exactly, and 16-byte bf16 vectors over the warps in the main tile; None where C does not split so. A
    power-of-two C fills Triton's one tile without masked lanes, and Triton's kernels were faster there (DiT-L's 1024:
    backward 114 us against 118, docs/benchmarks.md)."""
    block_c = triton.next_power_of_2(C) // 2
    tail = C - block_c
    warps = block_c // 256
    if not 1 <= warps <= 16 or tail >= block_c or tail & (tail - 1) or tail % (32 * warps):
        return None
    return block_c, tail, warps


@gluon.constexpr_function
def _tile(rows: int, width: int, warps: int):
    """A tile's layout: all its rows in each thread, its columns over 32 lanes and `warps` warps."""
    return gl.BlockedLayout([rows, width // (32 * warps)], [1, 32], [1, warps], [1, 0])


@gluon.jit
def _boundary_fwd_kernel(
    X, GATE, Y, BIAS, OUT, H, SHIFT, SCALE, MEAN, RSTD,  # x, y, out, h: (B*N, C); bias: (C,); modulation rows; mean, rstd: (B*N,)
    N, C, gate_stride, shift_stride, scale_stride, eps,
    BLOCK_M: gl.constexpr, BLOCK_C: gl.constexpr, TW: gl.constexpr, W: gl.constexpr, HAS_BIAS: gl.constexpr,
):
    LM: gl.constexpr = _tile(BLOCK_M, BLOCK_C, W)  # main tile
    LT: gl.constexpr = _tile(BLOCK_M, TW, W)  # tail tile
    RM: gl.constexpr = gl.SliceLayout(1, LM)  # per-row vectors of each tile
    RT: gl.constexpr = gl.SliceLayout(1, LT)
    cm = gl.arange(0, BLOCK_C, layout=gl.SliceLayout(0, LM))
    ct = BLOCK_C + gl.arange(0, TW, layout=gl.SliceLayout(0, LT))
    b = gl.program_id(1)
    rn_m = gl.program_id(0) * BLOCK_M + gl.arange(0, BLOCK_M, layout=RM)
    rn_t = gl.program_id(0) * BLOCK_M + gl.arange(0, BLOCK_M, layout=RT)
    ok_m, ok_t = rn_m < N, rn_t < N
    r_m = b.to(gl.int64) * N + rn_m
    r_t = b.to(gl.int64) * N + rn_t
    km, kt = ok_m[:, None] & (cm < C)[None, :], ok_t[:, None] & (ct < C)[None, :]
    om, ot = r_m[:, None] * C + cm[None, :], r_t[:, None] * C + ct[None, :]
    y_m = gl.load(Y + om, mask=km, other=0.0).to(gl.float32)
    y_t = gl.load(Y + ot, mask=kt, other=0.0).to(gl.float32)
    if HAS_BIAS:
        y_m += gl.load(BIAS + cm).to(gl.float32)[None, :]
        y_t += gl.load(BIAS + ct).to(gl.float32)[None, :]
    x_m = gl.load(X + om, mask=km, other=0.0).to(gl.float32) + gl.load(GATE + b * gate_stride + cm).to(gl.float32)[None, :] * y_m
    x_t = gl.load(X + ot, mask=kt, other=0.0).to(gl.float32) + gl.load(GATE + b * gate_stride + ct).to(gl.float32)[None, :] * y_t
    x_m, x_t = x_m.to(OUT.dtype.element_ty), x_t.to(OUT.dtype.element_ty)
    gl.store(OUT + om, x_m, mask=km)
    gl.store(OUT + ot, x_t, mask=kt)
    x_m, x_t = x_m.to(gl.float32), x_t.to(gl.float32)
    # LayerNorm of out, shifted by each row's first element (as _ln_modulate in _triton_ops)
    x0 = gl.sum(gl.where(cm[None, :] == 0, x_m, 0.0), axis=1)  # (BLOCK_M,)
    d_m = gl.where(km, x_m - x0[:, None], 0.0)
    d_t = gl.where(kt, x_t - gl.convert_layout(x0, RT)[:, None], 0.0)
    mean_d = (gl.sum(d_m, axis=1) + gl.convert_layout(gl.sum(d_t, axis=1), RM)) / C
    xc_m = gl.where(km, d_m - mean_d[:, None], 0.0)
    xc_t = gl.where(kt, d_t - gl.convert_layout(mean_d, RT)[:, None], 0.0)
    rstd = 1.0 / gl.sqrt((gl.sum(xc_m * xc_m, axis=1) + gl.convert_layout(gl.sum(xc_t * xc_t, axis=1), RM)) / C + eps)
    gamma_m = 1.0 + gl.load(SCALE + b * scale_stride + cm).to(gl.float32)
    gamma_t = 1.0 + gl.load(SCALE + b * scale_stride + ct).to(gl.float32)
    h_m = xc_m * rstd[:, None] * gamma_m[None, :] + gl.load(SHIFT + b * shift_stride + cm).to(gl.float32)[None, :]
    h_t = xc_t * gl.convert_layout(rstd, RT)[:, None] * gamma_t[None, :] + gl.load(SHIFT + b * shift_stride + ct).to(gl.float32)[None, :]
    gl.store(H + om, h_m.to(H.dtype.element_ty), mask=km)
    gl.store(H + ot, h_t.to(H.dtype.element_ty), mask=kt)
    gl.store(MEAN + r_m, x0 + mean_d, mask=ok_m)
    gl.store(RSTD + r_m, rstd, mask=ok_m)


@gluon.jit
def _boundary_bwd_kernel(
    DOUT, DH, OUT, Y, BIAS, GATE, SCALE, MEAN, RSTD, DX, DY, DSCALE_P, DSHIFT_P, DGATE_P, DBIAS_P,  # partials: (B, T, C) fp32
    N, C, gate_stride, scale_stride, rows_per_prog, T,
    BLOCK_M: gl.constexpr, BLOCK_C: gl.constexpr, TW: gl.constexpr, W: gl.constexpr, HAS_BIAS: gl.constexpr,
):
    LM: gl.constexpr = _tile(BLOCK_M, BLOCK_C, W)  # main tile
    LT: gl.constexpr = _tile(BLOCK_M, TW, W)  # tail tile
    RM: gl.constexpr = gl.SliceLayout(1, LM)  # per-row vectors of each tile
    RT: gl.constexpr = gl.SliceLayout(1, LT)
    CM: gl.constexpr = gl.SliceLayout(0, LM)  # per-column vectors of each tile
    CT: gl.constexpr = gl.SliceLayout(0, LT)
    cm = gl.arange(0, BLOCK_C, layout=CM)
    ct = BLOCK_C + gl.arange(0, TW, layout=CT)
    t = gl.program_id(0)
    b = gl.program_id(1)
    gamma_m = 1.0 + gl.load(SCALE + b * scale_stride + cm).to(gl.float32)
    gamma_t = 1.0 + gl.load(SCALE + b * scale_stride + ct).to(gl.float32)
    gate_m = gl.load(GATE + b * gate_stride + cm).to(gl.float32)
    gate_t = gl.load(GATE + b * gate_stride + ct).to(gl.float32)
    if HAS_BIAS:
        bias_m = gl.load(BIAS + cm).to(gl.float32)
        bias_t = gl.load(BIAS + ct).to(gl.float32)
    else:
        bias_m = gl.full([BLOCK_C], 0.0, gl.float32, layout=CM)
        bias_t = gl.full([TW], 0.0, gl.float32, layout=CT)
    # column sums over this program's rows: dscale, dshift, dgate, and dx (for dbias)
    a_sc_m = gl.full([BLOCK_C], 0.0, gl.float32, layout=CM)
    a_sh_m = gl.full([BLOCK_C], 0.0, gl.float32, layout=CM)
    a_g_m = gl.full([BLOCK_C], 0.0, gl.float32, layout=CM)
    a_x_m = gl.full([BLOCK_C], 0.0, gl.float32, layout=CM)
    a_sc_t = gl.full([TW], 0.0, gl.float32, layout=CT)
    a_sh_t = gl.full([TW], 0.0, gl.float32, layout=CT)
    a_g_t = gl.full([TW], 0.0, gl.float32, layout=CT)
    a_x_t = gl.full([TW], 0.0, gl.float32, layout=CT)
    row_start = t * rows_per_prog
    row_end = gl.minimum(row_start + rows_per_prog, N)
    for i in range(0, rows_per_prog, BLOCK_M):
        rn_m = row_start + i + gl.arange(0, BLOCK_M, layout=RM)
        rn_t = row_start + i + gl.arange(0, BLOCK_M, layout=RT)
        ok_m, ok_t = rn_m < row_end, rn_t < row_end
        r_m = b.to(gl.int64) * N + rn_m
        r_t = b.to(gl.int64) * N + rn_t
        km, kt = ok_m[:, None] & (cm < C)[None, :], ok_t[:, None] & (ct < C)[None, :]
        om, ot = r_m[:, None] * C + cm[None, :], r_t[:, None] * C + ct[None, :]
        dh_m = gl.load(DH + om, mask=km, other=0.0).to(gl.float32)
        dh_t = gl.load(DH + ot, mask=kt, other=0.0).to(gl.float32)
        x_m = gl.load(OUT + om, mask=km, other=0.0).to(gl.float32)
        x_t = gl.load(OUT + ot, mask=kt, other=0.0).to(gl.float32)
        mean_m = gl.load(MEAN + r_m, mask=ok_m, other=0.0)
        rstd_m = gl.load(RSTD + r_m, mask=ok_m, other=0.0)
        rstd_t = gl.convert_layout(rstd_m, RT)
        # LayerNorm's backward: dx = rstd (g - mean(g) - xhat mean(g xhat)), g = dh (1 + scale)
        xh_m = gl.where(km, (x_m - mean_m[:, None]) * rstd_m[:, None], 0.0)
        xh_t = gl.where(kt, (x_t - gl.convert_layout(mean_m, RT)[:, None]) * rstd_t[:, None], 0.0)
        g_m = dh_m * gamma_m[None, :]
        g_t = dh_t * gamma_t[None, :]
        mean_g = (gl.sum(g_m, axis=1) + gl.convert_layout(gl.sum(g_t, axis=1), RM)) / C
        mean_gx = (gl.sum(g_m * xh_m, axis=1) + gl.convert_layout(gl.sum(g_t * xh_t, axis=1), RM)) / C
        dx_m = (g_m - mean_g[:, None] - xh_m * mean_gx[:, None]) * rstd_m[:, None]
        dx_t = (g_t - gl.convert_layout(mean_g, RT)[:, None] - xh_t * gl.convert_layout(mean_gx, RT)[:, None]) * rstd_t[:, None]
        # plus the residual's gradient; dy = dx gate
        dx_m = gl.where(km, dx_m + gl.load(DOUT + om, mask=km, other=0.0).to(gl.float32), 0.0)
        dx_t = gl.where(kt, dx_t + gl.load(DOUT + ot, mask=kt, other=0.0).to(gl.float32), 0.0)
        y_m = gl.load(Y + om, mask=km, other=0.0).to(gl.float32) + bias_m[None, :]
        y_t = gl.load(Y + ot, mask=kt, other=0.0).to(gl.float32) + bias_t[None, :]
        gl.store(DX + om, dx_m.to(DX.dtype.element_ty), mask=km)
        gl.store(DX + ot, dx_t.to(DX.dtype.element_ty), mask=kt)
        gl.store(DY + om, (dx_m * gate_m[None, :]).to(DY.dtype.element_ty), mask=km)
        gl.store(DY + ot, (dx_t * gate_t[None, :]).to(DY.dtype.element_ty), mask=kt)
        a_sc_m += gl.sum(dh_m * xh_m, axis=0)
        a_sc_t += gl.sum(dh_t * xh_t, axis=0)
        a_sh_m += gl.sum(dh_m, axis=0)
        a_sh_t += gl.sum(dh_t, axis=0)
        a_g_m += gl.sum(dx_m * y_m, axis=0)
        a_g_t += gl.sum(dx_t * y_t, axis=0)
        if HAS_BIAS:
            a_x_m += gl.sum(dx_m, axis=0)
            a_x_t += gl.sum(dx_t, axis=0)
    pm = (b.to(gl.int64) * T + t) * C + cm
    pt = (b.to(gl.int64) * T + t) * C + ct
    gl.store(DSCALE_P + pm, a_sc_m)
    gl.store(DSCALE_P + pt, a_sc_t)
    gl.store(DSHIFT_P + pm, a_sh_m)
    gl.store(DSHIFT_P + pt, a_sh_t)
    gl.store(DGATE_P + pm, a_g_m)
    gl.store(DGATE_P + pt, a_g_t)
    if HAS_BIAS:
        gl.store(DBIAS_P + pm, a_x_m * gate_m)  # dy = dx gate, summed over this program's rows
        gl.store(DBIAS_P + pt, a_x_t * gate_t)


def boundary_fwd(args: tuple, N: int, B: int, tiles: tuple[int, int, int], has_bias: bool) -> None:
    """Launch the forward on `_triton_ops.gate_res_adaln_fwd`'s kernel arguments; `tiles` from `split`."""
    block_c, tw, warps = tiles
    _boundary_fwd_kernel[(triton.cdiv(N, FWD_BLOCK_M), B)](
        *args, BLOCK_M=FWD_BLOCK_M, BLOCK_C=block_c, TW=tw, W=warps, HAS_BIAS=has_bias, num_warps=warps)


def boundary_bwd(args: tuple, T: int, B: int, tiles: tuple[int, int, int], has_bias: bool) -> None:
    """Launch the backward on `_triton_ops.gate_res_adaln_bwd_partials`'s kernel arguments; `tiles` from `split`."""
    block_c, tw, warps = tiles
    _boundary_bwd_kernel[(T, B)](*args, BLOCK_M=BWD_BLOCK_M, BLOCK_C=block_c, TW=tw, W=warps, HAS_BIAS=has_bias, num_warps=warps)
