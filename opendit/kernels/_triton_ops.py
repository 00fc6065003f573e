"""Triton kernels and launchers for fused adaLN (LayerNorm + modulate), gate + residual, and GELU + float8 row quantization.

Imported by `opendit.kernels.fused_adaln`, which the models import only where the kernels run; this module requires triton.
All math is fp32 in registers; only the final stores round to the output dtype.
Every program works on rows of a single sample (grid axis 1 = sample), so per-sample shift/scale/gate rows are
loaded once per program and the backward's sums over N are per-program partials (B, T, C), summed by torch: the
`*_partials` launchers return them (the autograd functions sum them where torch.compile fuses the sums with what
follows), the plain launchers return the sums.
Measured on one H200 (bf16, C=1152): forward ~73% and forward+backward ~65-70% of device-copy bandwidth.
"""

import os

import torch
import triton
import triton.language as tl

try:  # read when this module is imported, like @triton.jit does
    INTERPRET = bool(triton.knobs.runtime.interpret)
except AttributeError:  # triton < 3.4
    INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
MAX_BLOCK_C = 16384  # rows wider than this would spill registers: the caller falls back to PyTorch
_BWD_ROW_ALIGN = 16  # rows per backward program are a multiple of this (larger BLOCK_M just masks the tail)


# Autotune on GPU unless OPENDIT_TRITON_AUTOTUNE=0 (then, and under the interpreter, heuristics pick the config).
AUTOTUNE = not INTERPRET and os.environ.get("OPENDIT_TRITON_AUTOTUNE", "1") != "0"

try:  # the block boundary's Gluon kernels (triton >= 3.6, whose Gluon they were written and measured on)
    from opendit.kernels import _gluon_ops as _gluon
except ImportError:
    _gluon = None
_TRITON_VERSION = tuple(int(p) for p in triton.__version__.split(".")[:2] if p.isdigit())
# On NVIDIA GPUs the block boundary runs Gluon's two-tile kernels where its width splits (`_gluon_ops.split`), unless
# OPENDIT_GLUON=0; the Triton kernels remain for other widths, the interpreter, explicit configs and ROCm (Gluon's
# layouts here name 32-lane warps).
GLUON = (_gluon is not None and _TRITON_VERSION >= (3, 6) and not INTERPRET and torch.version.hip is None
         and os.environ.get("OPENDIT_GLUON", "1") != "0")


def _tile_ok(block_m: int, block_c: int, num_warps: int) -> bool:
    """16..64 elements per thread in a tile of 2K..8K elements (a single row where rows are longer)."""
    tile = block_m * block_c
    return 16 <= tile // (32 * num_warps) <= 64 and (2048 <= tile <= 8192 or block_m == 1)


def _candidates(variants: list[dict]) -> list[dict]:
    """Autotune candidates: (BLOCK_M, num_warps) pairs crossed with kernel-specific variants; pruned by `_tile_ok`."""
    pairs = [dict(BLOCK_M=m, num_warps=w) for m in (1, 2, 4, 8, 16, 32, 64) for w in (2, 4, 8)]
    return [dict(p, **v) for p in pairs for v in variants]


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def _heuristic(width: int, tile: int, per_thread: int, **extra) -> dict:
    """Config without autotuning: a tile of about `tile` elements (or one row) of `width` columns, `per_thread` elements
    per thread."""
    if INTERPRET:
        return dict(BLOCK_M=4, num_warps=1, **extra)  # several rows per program: CPU tests cover masked row tails
    block_m = _pow2_floor(tile // width)
    return dict(BLOCK_M=block_m, num_warps=min(16, _pow2_floor(block_m * width // (32 * per_thread))), **extra)


def _prune(configs, named_args, **kwargs):
    """Autotune pre-filter: keep configs with `_tile_ok` (the smallest one if none is)."""
    width = kwargs["BLOCK_C"] + kwargs.get("BLOCK_T", 0)  # two column tiles where a kernel has a tail
    ok = [c for c in configs if _tile_ok(c.kwargs["BLOCK_M"], width, c.num_warps)]
    return ok or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"], c.num_warps))]


def _autotuned(kernel, candidates: list[dict], key: tuple[str, ...] = ("N", "C")):
    """The autotuned twin of a @triton.jit kernel (keyed on `key` and the dtypes)."""
    configs = []
    for c in candidates:
        c = dict(c)
        configs.append(triton.Config(c, num_warps=c.pop("num_warps"), num_stages=1))
    return triton.autotune(configs=configs, key=list(key), prune_configs_by={"early_config_prune": _prune})(kernel)


BWD_KEY = ("N", "C", "rows_per_prog")  # a backward's best tile depends on the rows each program sums over


def _launch(kernel, tuned, grid, args, block_c: int, config: dict | None, heuristic: dict, **constexprs):
    """Launch with `config` if given, else autotuned, else `heuristic` (`constexprs`: the kernel's other switches)."""
    if config is None and AUTOTUNE:
        tuned[grid](*args, BLOCK_C=block_c, **constexprs)
    else:
        kernel[grid](*args, BLOCK_C=block_c, **constexprs, **{"num_stages": 1, **(config or heuristic)})


_SMS: dict[int, int] = {}  # a plain dict, not functools.lru_cache: torch.compile traces this (from the backward's rows)


def _num_sms(index: int) -> int:
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


def _num_programs_target(device: torch.device, per_sm: int = 2) -> int:
    """How many programs a backward launch should have: per_sm per SM (2: measured best for the adaLN kernels on H200)."""
    if device.type != "cuda":
        return 4
    return per_sm * _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def _rows_for(rows: int, programs: int) -> int:
    """Rows per program for `rows` rows over at most `programs` programs: a multiple of _BWD_ROW_ALIGN."""
    return triton.cdiv(triton.cdiv(rows, programs), _BWD_ROW_ALIGN) * _BWD_ROW_ALIGN


def bwd_rows_per_program(B: int, N: int, device: torch.device, per_sm: int = 2) -> int:
    """Rows of one sample handled by one backward program (a multiple of _BWD_ROW_ALIGN), so that the B * T programs
    fill at most one wave of the target: a second, partial wave costs more than the larger tiles (DiT-XL/2, batch 128:
    384 programs took 200 us where 256 took 155, docs/benchmarks.md)."""
    if INTERPRET:
        return 8  # small, so the CPU tests cover several tiles per sample and a loop per tile
    tiles = max(1, _num_programs_target(device, per_sm) // B)
    return _rows_for(N, tiles)


def _gluon_tiles(C: int, device: torch.device, config: dict | None = None) -> tuple[int, int, int] | None:
    """The block boundary's Gluon tiles for a launch of width C on `device`, or None: the Triton kernel runs."""
    return _gluon.split(C) if GLUON and config is None and device.type == "cuda" else None


def boundary_bwd_rows(B: int, N: int, C: int, device: torch.device) -> int:
    """Rows per program of the block boundary's backward: `bwd_rows_per_program`, with Gluon's kernel aiming at
    _gluon.WARPS_PER_SM warps per SM (its programs have BLOCK_C / 256 warps: DiT-B/2 at batch 64 sums 32 rows a program in
    48 us where 64 rows took 66; DiT-XL/2 keeps 128)."""
    tiles = _gluon_tiles(C, device)
    return bwd_rows_per_program(B, N, device, max(1, _gluon.WARPS_PER_SM // tiles[2]) if tiles else 2)


# ----------------------------------------------------------------------------- fused adaLN
# Kernels use only triton.language builtins plus the helpers below (not tl.sum / tl.zeros, which triton defines
# with @jit at its own import): then they also run under the interpreter when triton was imported before
# TRITON_INTERPRET=1 was set, as happens in a full CPU test session.


@triton.jit
def _add(a, b):
    return a + b


# tl.sum's own combine function when present: the interpreter reduces it with numpy (fast) instead of per element.
_SUM_COMBINE = getattr(getattr(tl, "standard", None), "_sum_combine", _add)


@triton.jit
def _sum(x, axis: tl.constexpr):
    """Sum over `axis` (same reduction as tl.sum)."""
    return tl.reduce(x, axis, _SUM_COMBINE)


def row_tiles(C: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_T): a row of C as two power-of-two column tiles, [0, BLOCK_C) and [BLOCK_C, BLOCK_C + BLOCK_T):
    the largest power of two below C and a tail covering the rest. DiT's widths split exactly (1152 = 1024 + 128, 4608 =
    4096 + 512, 768 = 512 + 256) where one tile would mask up to 44% of its lanes. The LayerNorm kernels keep one
    tile: with two, their backward ran at 227 us instead of 154 at DiT-XL/2's shape, the two tiles' row sums meeting in
    different layouts (docs/benchmarks.md)."""
    block_c = max(1, triton.next_power_of_2(C) // 2)
    return block_c, triton.next_power_of_2(max(1, C - block_c))


@triton.jit
def _load_rows(PTR, b, N, C, rows_n, row_end, cols, col_ok):
    """(BLOCK_M, BLOCK_C) tile of rows `rows_n` (< row_end) of sample b, in the tensor's dtype (0 outside)."""
    rows = b.to(tl.int64) * N + rows_n
    mask = (rows_n < row_end)[:, None] & col_ok[None, :]
    return tl.load(PTR + rows[:, None] * C + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _ln_modulate(x, x0, mask, C, eps, scale, shift):
    """LayerNorm + modulate of an fp32 (BLOCK_M, BLOCK_C) tile whose rows start with x0 -> (h, mean, rstd). The mean
    of (x - x0), then x0 added back: exact for constant rows, accurate for offset rows; biased variance."""
    d = tl.where(mask, x - x0[:, None], 0.0)
    mean_d = _sum(d, axis=1) / C
    xc = tl.where(mask, d - mean_d[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(_sum(xc * xc, axis=1) / C + eps)
    return xc * rstd[:, None] * (1.0 + scale[None, :]) + shift[None, :], x0 + mean_d, rstd


@triton.jit
def _ln_modulate_grad(x, dy, mean, rstd, mask, C, gamma):
    """The input gradient of LayerNorm + modulate (gamma = 1 + scale) for an fp32 tile, and x normalised: (dx, xhat)."""
    xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    g = dy * gamma[None, :]  # grad w.r.t. xhat; 0 outside the mask
    mean_g = _sum(g, axis=1) / C
    mean_gx = _sum(g * xhat, axis=1) / C
    return (g - mean_g[:, None] - xhat * mean_gx[:, None]) * rstd[:, None], xhat


@triton.jit
def _adaln_fwd_kernel(
    X, Y, SHIFT, SCALE, MEAN, RSTD,  # x, y: (B*N, C); shift, scale: rows of stride *_stride; mean, rstd: (B*N,)
    N, C, shift_stride, scale_stride, eps,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, TILES: tl.constexpr, PREFETCH: tl.constexpr,
):
    pid = tl.program_id(0)  # group of TILES row tiles inside the sample
    b = tl.program_id(1)  # sample: every row of this program belongs to it
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    scale = tl.load(SCALE + b * scale_stride + cols, mask=col_ok, other=0.0).to(tl.float32)  # (BLOCK_C,)
    shift = tl.load(SHIFT + b * shift_stride + cols, mask=col_ok, other=0.0).to(tl.float32)
    first = pid * TILES * BLOCK_M
    x_next = _load_rows(X, b, N, C, first + tl.arange(0, BLOCK_M), N, cols, col_ok)
    for i in range(TILES):
        rows_n = first + i * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) row index within the sample
        if PREFETCH:  # issue the next tile's loads before this tile's math
            x = x_next
            x_next = _load_rows(X, b, N, C, rows_n + BLOCK_M, tl.minimum(first + TILES * BLOCK_M, N), cols, col_ok)
        else:
            x = _load_rows(X, b, N, C, rows_n, N, cols, col_ok)
        x = x.to(tl.float32)
        row_ok = rows_n < N
        mask = row_ok[:, None] & col_ok[None, :]
        rows = b.to(tl.int64) * N + rows_n  # global row in (B*N)
        x0 = tl.load(X + rows * C, mask=row_ok, other=0.0).to(tl.float32)  # (BLOCK_M,) same cache lines as x
        y, mean, rstd = _ln_modulate(x, x0, mask, C, eps, scale, shift)
        tl.store(Y + rows[:, None] * C + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
        tl.store(MEAN + rows, mean, mask=row_ok)
        tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _adaln_bwd_kernel(
    X, DY, DX, SCALE, MEAN, RSTD, DSCALE_P, DSHIFT_P,  # partials: (B, T, C) fp32
    N, C, scale_stride, rows_per_prog, T,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, PREFETCH: tl.constexpr,
):
    t = tl.program_id(0)  # row tile inside the sample
    b = tl.program_id(1)  # sample
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    gamma = 1.0 + tl.load(SCALE + b * scale_stride + cols, mask=col_ok, other=0.0).to(tl.float32)  # (BLOCK_C,)
    acc_dscale = tl.full([BLOCK_C], 0.0, tl.float32)
    acc_dshift = tl.full([BLOCK_C], 0.0, tl.float32)
    row_start = t * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, N)
    x_next = _load_rows(X, b, N, C, row_start + tl.arange(0, BLOCK_M), row_end, cols, col_ok)
    dy_next = _load_rows(DY, b, N, C, row_start + tl.arange(0, BLOCK_M), row_end, cols, col_ok)
    for i in range(0, rows_per_prog, BLOCK_M):
        rows_n = row_start + i + tl.arange(0, BLOCK_M)
        if PREFETCH:  # issue the next tile's loads before this tile's math
            x, dy = x_next, dy_next
            x_next = _load_rows(X, b, N, C, rows_n + BLOCK_M, row_end, cols, col_ok)
            dy_next = _load_rows(DY, b, N, C, rows_n + BLOCK_M, row_end, cols, col_ok)
        else:
            x = _load_rows(X, b, N, C, rows_n, row_end, cols, col_ok)
            dy = _load_rows(DY, b, N, C, rows_n, row_end, cols, col_ok)
        x, dy = x.to(tl.float32), dy.to(tl.float32)  # (BLOCK_M, BLOCK_C)
        row_ok = rows_n < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        rows = b.to(tl.int64) * N + rows_n
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)  # (BLOCK_M,)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        dx, xhat = _ln_modulate_grad(x, dy, mean, rstd, mask, C, gamma)
        tl.store(DX + rows[:, None] * C + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        acc_dscale += _sum(dy * xhat, axis=0)
        acc_dshift += _sum(dy, axis=0)
    p_offs = (b.to(tl.int64) * T + t) * C + cols
    tl.store(DSCALE_P + p_offs, acc_dscale, mask=col_ok)
    tl.store(DSHIFT_P + p_offs, acc_dshift, mask=col_ok)


FWD_CANDIDATES = _candidates([dict(TILES=1, PREFETCH=False), dict(TILES=8, PREFETCH=True)])
BWD_CANDIDATES = _candidates([dict(PREFETCH=True)])
_adaln_fwd_tuned = _autotuned(_adaln_fwd_kernel, FWD_CANDIDATES)
_adaln_bwd_tuned = _autotuned(_adaln_bwd_kernel, BWD_CANDIDATES, BWD_KEY)


def adaln_fwd(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, config=None):
    """x: (B, N, C) contiguous; shift/scale: (B, C) with unit column stride -> y (B, N, C), mean, rstd (B*N,) fp32."""
    B, N, C = x.shape
    y = torch.empty_like(x)
    mean = torch.empty(B * N, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    if B * N == 0:
        return y, mean, rstd
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"] * meta["TILES"]), B)  # noqa: E731
    args = (x, y, shift, scale, mean, rstd, N, C, shift.stride(0), scale.stride(0), eps)
    bc = triton.next_power_of_2(C)
    heuristic = _heuristic(bc, 4096, 32, TILES=8, PREFETCH=True)  # 2 rows x 4 warps at C=1152
    _launch(_adaln_fwd_kernel, _adaln_fwd_tuned, grid, args, bc, config, heuristic)
    return y, mean, rstd


def partials_length(N: int, rows_per_prog: int) -> int:
    """T of a backward's (..., T, C) partials: its programs along N (1 for an empty input, whose partials are zeros)."""
    return triton.cdiv(N, rows_per_prog) if N else 1


def bwd_programs(tiles: int, N: int, device: torch.device, per_sm: int = 2) -> int:
    """T, the backward programs along N per tile (sample, column block): the partials' length along T."""
    return partials_length(N if tiles else 0, bwd_rows_per_program(tiles, N, device, per_sm))


def adaln_bwd_partials(dy, x, scale, mean, rstd, config=None, rows_per_prog=None):
    """dy, x: (B, N, C) contiguous -> dx (B, N, C) and the (2, B, T, C) fp32 partials of dscale, dshift (sum over T)."""
    B, N, C = x.shape
    dx = torch.empty_like(x)
    if B * N == 0:
        return dx, torch.zeros(2, B, 1, C, device=x.device, dtype=torch.float32)
    rows_per_prog = rows_per_prog or bwd_rows_per_program(B, N, x.device)
    T = triton.cdiv(N, rows_per_prog)
    partials = torch.empty(2, B, T, C, device=x.device, dtype=torch.float32)  # small: B*T ~ 2 * #SMs rows
    args = (x, dy, dx, scale, mean, rstd, partials[0], partials[1], N, C, scale.stride(0), rows_per_prog, T)
    bc = triton.next_power_of_2(C)
    heuristic = _heuristic(bc, 8192, 64, PREFETCH=True)  # 4 rows x 4 warps at C=1152
    _launch(_adaln_bwd_kernel, _adaln_bwd_tuned, (T, B), args, bc, config, heuristic)
    return dx, partials


def adaln_bwd(dy, x, scale, mean, rstd, config=None, rows_per_prog=None):
    """dy, x: (B, N, C) contiguous -> dx (B, N, C), dscale and dshift (B, C) in fp32."""
    dx, partials = adaln_bwd_partials(dy, x, scale, mean, rstd, config, rows_per_prog)
    dscale, dshift = partials.sum(2).unbind(0)
    return dx, dscale, dshift


# ----------------------------------------------------------------------------- gate + residual


def _gate_block_c(C: int) -> int:
    """Column tile of the elementwise gate kernels (small under the interpreter to test several tiles)."""
    return min(triton.next_power_of_2(C), 64 if INTERPRET else 1024)


@triton.jit
def _gate_res_fwd_kernel(
    X, GATE, Y, OUT,  # x, y, out: (B*N, C); gate: rows of stride gate_stride
    N, C, gate_stride,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    rows_n = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    col_ok = cols < C
    mask = (rows_n < N)[:, None] & col_ok[None, :]
    offs = (b.to(tl.int64) * N + rows_n)[:, None] * C + cols[None, :]
    gate = tl.load(GATE + b * gate_stride + cols, mask=col_ok, other=0.0).to(tl.float32)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + offs, (x + gate[None, :] * y).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _gate_res_bwd_kernel(
    DOUT, GATE, Y, DY, DGATE_P,  # dout, y, dy: (B*N, C); partials: (B, T, C) fp32
    N, C, gate_stride, rows_per_prog, T,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    t = tl.program_id(0)
    b = tl.program_id(1)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    gate = tl.load(GATE + b * gate_stride + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc = tl.full([BLOCK_C], 0.0, tl.float32)
    row_start = t * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, N)
    for i in range(0, rows_per_prog, BLOCK_M):
        rows_n = row_start + i + tl.arange(0, BLOCK_M)
        mask = (rows_n < row_end)[:, None] & col_ok[None, :]
        offs = (b.to(tl.int64) * N + rows_n)[:, None] * C + cols[None, :]
        dout = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DY + offs, (dout * gate[None, :]).to(DY.dtype.element_ty), mask=mask)
        acc += _sum(dout * y, axis=0)
    tl.store(DGATE_P + (b.to(tl.int64) * T + t) * C + cols, acc, mask=col_ok)


GATE_CANDIDATES = _candidates([{}])
_gate_res_fwd_tuned = _autotuned(_gate_res_fwd_kernel, GATE_CANDIDATES)
_gate_res_bwd_tuned = _autotuned(_gate_res_bwd_kernel, GATE_CANDIDATES, BWD_KEY)


def gate_res_fwd(x, gate, y, out_dtype: torch.dtype, config=None) -> torch.Tensor:
    """x, y: (B, N, C) contiguous; gate: (B, C) unit column stride -> x + gate[:, None] * y."""
    B, N, C = x.shape
    out = torch.empty(x.shape, device=x.device, dtype=out_dtype)
    if B * N == 0:
        return out
    block_c = _gate_block_c(C)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B, triton.cdiv(C, block_c))  # noqa: E731
    args = (x, gate, y, out, N, C, gate.stride(0))
    _launch(_gate_res_fwd_kernel, _gate_res_fwd_tuned, grid, args, block_c, config, _heuristic(block_c, 2048, 16))
    return out


def gate_res_bwd_partials(dout, gate, y, config=None, rows_per_prog=None):
    """dout, y: (B, N, C) contiguous -> dy (B, N, C) in y.dtype and the (B, T, C) fp32 partials of dgate (sum over T)."""
    B, N, C = y.shape
    dy = torch.empty_like(y)
    if B * N == 0:
        return dy, torch.zeros(B, 1, C, device=y.device, dtype=torch.float32)
    block_c = _gate_block_c(C)
    n_cblocks = triton.cdiv(C, block_c)
    rows_per_prog = rows_per_prog or gate_res_bwd_rows(B, N, C, y.device)
    T = triton.cdiv(N, rows_per_prog)
    dgate_p = torch.empty(B, T, C, device=y.device, dtype=torch.float32)
    args = (dout, gate, y, dy, dgate_p, N, C, gate.stride(0), rows_per_prog, T)
    heuristic = _heuristic(block_c, 2048, 16)
    _launch(_gate_res_bwd_kernel, _gate_res_bwd_tuned, (T, B, n_cblocks), args, block_c, config, heuristic)
    return dy, dgate_p


def gate_res_bwd_rows(B: int, N: int, C: int, device: torch.device) -> int:
    """Rows per program of gate_res_bwd_partials."""
    return bwd_rows_per_program(B * triton.cdiv(C, _gate_block_c(C)), N, device)


def gate_res_bwd(dout, gate, y, config=None):
    """dout, y: (B, N, C) contiguous -> dy (B, N, C) in y.dtype, dgate (B, C) fp32."""
    dy, dgate_p = gate_res_bwd_partials(dout, gate, y, config)
    return dy, dgate_p.sum(1)


# ----------------------------------------------------------------------------- gate + residual, then adaLN
# Inside a DiT block the attention branch's residual update feeds the MLP's LayerNorm: x1 = x + gate * y and
# h = LN(x1) * (1 + scale) + shift in one pass (x1 rounded to its dtype first, as the two kernels would). Its backward
# adds x1's own gradient (from the next residual update) to the LayerNorm's, where autograd would add them in a
# separate pass, and writes dx and dy from the sum. With HAS_BIAS, y is the branch's last GEMM without its bias: the
# kernels add the bias (y + bias in fp32) and the backward sums its gradient (the sum of dy) with the others.


@triton.jit
def _gate_res_adaln_fwd_kernel(
    X, GATE, Y, BIAS, OUT, H, SHIFT, SCALE, MEAN, RSTD,  # x, y, out, h: (B*N, C); bias: (C,); modulation rows; mean, rstd: (B*N,)
    N, C, gate_stride, shift_stride, scale_stride, eps,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    b = tl.program_id(1)
    rows_n = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    row_ok = rows_n < N
    mask = row_ok[:, None] & col_ok[None, :]
    rows = b.to(tl.int64) * N + rows_n
    offs = rows[:, None] * C + cols[None, :]
    gate = tl.load(GATE + b * gate_stride + cols, mask=col_ok, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + b * scale_stride + cols, mask=col_ok, other=0.0).to(tl.float32)
    shift = tl.load(SHIFT + b * shift_stride + cols, mask=col_ok, other=0.0).to(tl.float32)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    x1 = (x + gate[None, :] * y).to(OUT.dtype.element_ty)
    tl.store(OUT + offs, x1, mask=mask)
    x1 = x1.to(tl.float32)
    x0 = _sum(tl.where(cols[None, :] == 0, x1, 0.0), axis=1)  # (BLOCK_M,) each row's first element
    h, mean, rstd = _ln_modulate(x1, x0, mask, C, eps, scale, shift)
    tl.store(H + offs, h.to(H.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _gate_res_adaln_bwd_kernel(
    DOUT, DH, OUT, Y, BIAS, GATE, SCALE, MEAN, RSTD, DX, DY, DSCALE_P, DSHIFT_P, DGATE_P, DBIAS_P,  # partials: (B, T, C) fp32
    N, C, gate_stride, scale_stride, rows_per_prog, T,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    t = tl.program_id(0)
    b = tl.program_id(1)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    gamma = 1.0 + tl.load(SCALE + b * scale_stride + cols, mask=col_ok, other=0.0).to(tl.float32)
    gate = tl.load(GATE + b * gate_stride + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc_dscale = tl.full([BLOCK_C], 0.0, tl.float32)
    acc_dshift = tl.full([BLOCK_C], 0.0, tl.float32)
    acc_dgate = tl.full([BLOCK_C], 0.0, tl.float32)
    acc_dx1 = tl.full([BLOCK_C], 0.0, tl.float32)
    bias = tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32) if HAS_BIAS else acc_dx1
    row_start = t * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, N)
    for i in range(0, rows_per_prog, BLOCK_M):
        rows_n = row_start + i + tl.arange(0, BLOCK_M)
        row_ok = rows_n < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        rows = b.to(tl.int64) * N + rows_n
        offs = rows[:, None] * C + cols[None, :]
        dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
        x1 = tl.load(OUT + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        dx1, xhat = _ln_modulate_grad(x1, dh, mean, rstd, mask, C, gamma)
        dx1 = tl.where(mask, dx1 + tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32), 0.0)
        y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32) + bias[None, :]
        tl.store(DX + offs, dx1.to(DX.dtype.element_ty), mask=mask)
        tl.store(DY + offs, (dx1 * gate[None, :]).to(DY.dtype.element_ty), mask=mask)
        acc_dscale += _sum(dh * xhat, axis=0)
        acc_dshift += _sum(dh, axis=0)
        acc_dgate += _sum(dx1 * y, axis=0)
        if HAS_BIAS:
            acc_dx1 += _sum(dx1, axis=0)
    p_offs = (b.to(tl.int64) * T + t) * C + cols
    tl.store(DSCALE_P + p_offs, acc_dscale, mask=col_ok)
    tl.store(DSHIFT_P + p_offs, acc_dshift, mask=col_ok)
    tl.store(DGATE_P + p_offs, acc_dgate, mask=col_ok)
    if HAS_BIAS:
        tl.store(DBIAS_P + p_offs, acc_dx1 * gate, mask=col_ok)  # dy = dx1 * gate, summed over this program's rows


_gate_res_adaln_fwd_tuned = _autotuned(_gate_res_adaln_fwd_kernel, GATE_CANDIDATES, ("N", "C", "HAS_BIAS"))
_gate_res_adaln_bwd_tuned = _autotuned(_gate_res_adaln_bwd_kernel, GATE_CANDIDATES, BWD_KEY + ("HAS_BIAS",))


def gate_res_adaln_fwd(x, gate, y, shift, scale, eps: float, out_dtype: torch.dtype, config=None, bias=None):
    """x, y: (B, N, C) contiguous; gate, shift, scale: (B, C) unit column stride; bias: None or (C,) -> out = x + gate[:, None]
    * (y + bias) in out_dtype, h = LN(out) * (1 + scale) + shift in out_dtype, mean and rstd of out (B*N,) fp32."""
    B, N, C = x.shape
    out = torch.empty(x.shape, device=x.device, dtype=out_dtype)
    h = torch.empty_like(out)
    mean = torch.empty(B * N, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    if B * N == 0:
        return out, h, mean, rstd
    bc = triton.next_power_of_2(C)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B)  # noqa: E731
    args = (x, gate, y, gate if bias is None else bias, out, h, shift, scale, mean, rstd, N, C, gate.stride(0), shift.stride(0), scale.stride(0), eps)
    tiles = _gluon_tiles(C, x.device, config)
    if tiles:
        _gluon.boundary_fwd(args, N, B, tiles, bias is not None)
        return out, h, mean, rstd
    heuristic = _heuristic(bc, 4096, 32)
    _launch(_gate_res_adaln_fwd_kernel, _gate_res_adaln_fwd_tuned, grid, args, bc, config, heuristic, HAS_BIAS=bias is not None)
    return out, h, mean, rstd


def gate_res_adaln_bwd_partials(dout, dh, out, y, gate, scale, mean, rstd, x_dtype: torch.dtype, config=None, rows_per_prog=None, bias=None):
    """dout, dh, out, y: (B, N, C) contiguous; bias: None or (C,), as given forward -> dx (in x_dtype), dy (in
    y.dtype), and the (3, B, T, C) fp32 partials of dscale, dshift, dgate (sum over T); (4, B, T, C) with a bias, the
    fourth summing to dbias over B and T."""
    B, N, C = out.shape
    dx = torch.empty(out.shape, device=out.device, dtype=x_dtype)
    dy = torch.empty_like(y)
    n_partials = 3 if bias is None else 4
    if B * N == 0:
        return dx, dy, torch.zeros(n_partials, B, 1, C, device=out.device, dtype=torch.float32)
    rows_per_prog = rows_per_prog or boundary_bwd_rows(B, N, C, out.device)
    T = triton.cdiv(N, rows_per_prog)
    partials = torch.empty(n_partials, B, T, C, device=out.device, dtype=torch.float32)
    args = (dout, dh, out, y, gate if bias is None else bias, gate, scale, mean, rstd, dx, dy, *partials[:3], partials[-1],
            N, C, gate.stride(0), scale.stride(0), rows_per_prog, T)
    tiles = _gluon_tiles(C, out.device, config)
    if tiles:
        _gluon.boundary_bwd(args, T, B, tiles, bias is not None)
        return dx, dy, partials
    bc = triton.next_power_of_2(C)
    heuristic = _heuristic(bc, 8192, 64)
    _launch(_gate_res_adaln_bwd_kernel, _gate_res_adaln_bwd_tuned, (T, B), args, bc, config, heuristic, HAS_BIAS=bias is not None)
    return dx, dy, partials


def gate_res_adaln_bwd(dout, dh, out, y, gate, scale, mean, rstd, x_dtype: torch.dtype, config=None, rows_per_prog=None, bias=None):
    """dout, dh, out, y: (B, N, C) contiguous -> dx (in x_dtype), dy (in y.dtype), and dgate, dscale, dshift (B, C) fp32;
    then dbias (C,) fp32 when a bias is given."""
    dx, dy, partials = gate_res_adaln_bwd_partials(dout, dh, out, y, gate, scale, mean, rstd, x_dtype, config, rows_per_prog, bias)
    dscale, dshift, dgate = partials[:3].sum(2).unbind(0)
    return (dx, dy, dgate, dscale, dshift) + (() if bias is None else (partials[3].sum((0, 1)),))


# ----------------------------------------------------------------------------- GELU + float8 row quantization

GELU_CONFIGS = [dict(BLOCK_M=m, num_warps=w) for m in (1, 2) for w in (4, 8)]  # autotuned per (M, K)
GELU_HEURISTIC = dict(BLOCK_M=1, num_warps=4)  # without autotuning: the best of GELU_CONFIGS at DiT-XL/2's sizes

E4M3_MAX = tl.constexpr(448.0)  # torch.finfo(torch.float8_e4m3fn).max


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _row_scale(amax):
    """Each row's scale s and 1 / s from its |y| max, which maps to 448 (1e-12 at least, so that 0 stays 0)."""
    amax = tl.maximum(amax, 1e-12)
    return amax / E4M3_MAX, (1.0 / amax) * E4M3_MAX


@triton.jit
def _scaled(y, inv_s):
    """y / s for (BLOCK_M, BLOCK) rows, as a product with their (BLOCK_M,) 1 / s, clamped to e4m3's range."""
    return tl.minimum(tl.maximum(y * inv_s[:, None], -E4M3_MAX), E4M3_MAX)


@triton.jit
def _exp_minus_2z(h):
    """exp(-2z) for tanh GELU's z = sqrt(2/pi) (h + 0.044715 h^3), in fp32, the exponent capped at 80 (no inf)."""
    return tl.exp(tl.minimum(-1.5957691216057308 * (h + 0.044715 * h * h * h), 80.0))


@triton.jit
def _gelu(h):
    """tanh GELU in fp32: 0.5 h (1 + tanh(z)) = h * sigmoid(2z) = h / (1 + exp(-2z)); the division is the fast one
    (2 ulp), far below the e4m3 rounding that follows."""
    return tl.fdiv(h, 1.0 + _exp_minus_2z(h))


@triton.jit
def _gelu_quantize_kernel(
    H, Q, SCALE,  # h, q: (M, K); scale: (M,) fp32
    M, K,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """BLOCK_M whole rows, each as two power-of-two column tiles: [0, BLOCK_K) and [BLOCK_K, BLOCK_K + BLOCK_T)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols = tl.arange(0, BLOCK_K)
    cols_t = BLOCK_K + tl.arange(0, BLOCK_T)
    mask = row_ok[:, None] & (cols < K)[None, :]
    mask_t = row_ok[:, None] & (cols_t < K)[None, :]
    offs = rows[:, None] * K + cols[None, :]
    offs_t = rows[:, None] * K + cols_t[None, :]
    g = _gelu(tl.load(H + offs, mask=mask, other=0.0).to(tl.float32))
    g_t = _gelu(tl.load(H + offs_t, mask=mask_t, other=0.0).to(tl.float32))
    scale, inv_scale = _row_scale(tl.maximum(tl.reduce(tl.abs(g), 1, _max), tl.reduce(tl.abs(g_t), 1, _max)))
    tl.store(Q + offs, _scaled(g, inv_scale).to(Q.dtype.element_ty), mask=mask)
    tl.store(Q + offs_t, _scaled(g_t, inv_scale).to(Q.dtype.element_ty), mask=mask_t)
    tl.store(SCALE + rows, scale, mask=row_ok)


_gelu_quantize_tuned = triton.autotune([triton.Config({k: v for k, v in c.items() if k != "num_warps"}, num_warps=c["num_warps"], num_stages=1) for c in GELU_CONFIGS],
                                       key=["M", "K"])(_gelu_quantize_kernel)


def gelu_quantize(h: torch.Tensor, config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """h: (M, K) contiguous -> (tanh-GELU(h) / scale in float8 e4m3 (M, K), scale (M, 1) fp32), each row's absolute
    maximum mapped to 448. One pass: each program holds whole rows in registers. config: one of GELU_CONFIGS, else
    autotuned (else GELU_HEURISTIC). Under the interpreter the kernel stores fp32 and torch rounds to e4m3 (the
    interpreter's own float8 conversion does not round to nearest)."""
    M, K = h.shape
    scale = torch.empty(M, 1, device=h.device, dtype=torch.float32)
    q = torch.empty(M, K, device=h.device, dtype=torch.float32 if INTERPRET else torch.float8_e4m3fn)
    if M == 0:
        return q.to(torch.float8_e4m3fn), scale
    block_k, block_t = row_tiles(K)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)  # noqa: E731
    if config is None and AUTOTUNE:
        _gelu_quantize_tuned[grid](h, q, scale, M, K, BLOCK_K=block_k, BLOCK_T=block_t)
    else:  # the interpreter: 2 rows a program, so the CPU tests cover a masked row tail (7 rows)
        config = config or (dict(BLOCK_M=2, num_warps=1) if INTERPRET else GELU_HEURISTIC)
        _gelu_quantize_kernel[grid](h, q, scale, M, K, BLOCK_K=block_k, BLOCK_T=block_t, num_stages=1, **config)
    return q.to(torch.float8_e4m3fn), scale


# ----------------------------------------------------------------------------- bias + GELU (training)
# Rows are the N = tokens x samples of the fc1 output, columns its C hidden features. The backward sums the bias
# gradient over its rows in the same pass (per-program partials (T, C), summed by torch), where autograd would
# read the GELU's gradient a second time for it.


def _gelu_block_c(C: int) -> int:
    """Column tile of the bias + GELU kernels: the largest power of two up to 1024 that divides C, at least 128 (4608:
    512, 3072: 1024), so that no column block is mostly masked (4608 in blocks of 1024 left half of the fifth empty: the
    forward took 162.7 us a call at DiT-XL/2's shape, 154.3 in blocks of 512). Small under the interpreter, to test
    several tiles."""
    if INTERPRET:
        return min(triton.next_power_of_2(C), 64)
    block = 1024
    while block > 128 and C % block:
        block //= 2
    return min(block, triton.next_power_of_2(C))


@triton.jit
def _gelu_grad(u):
    """(tanh-GELU(u), its derivative) in fp32. With e = exp(-2z), z = c (u + a u^3) and s = 1 / (1 + e): 1 + tanh z = 2s and
    1 - tanh^2 z = 4 e s^2 = 4 (1 - s) s (no cancellation, no overflow), so GELU = u s and its derivative
    s + 2 u (1 - s) s c (1 + 3a u^2). u is clamped to +-20 inside (beyond, s is exactly 0 or 1 in fp32)."""
    v = tl.minimum(tl.maximum(u, -20.0), 20.0)
    s = tl.fdiv(1.0, 1.0 + _exp_minus_2z(v))  # fast division
    return u * s, s + 2.0 * v * (1.0 - s) * s * 0.7978845608028654 * (1.0 + 0.134145 * v * v)


@triton.jit
def _bias_gelu_fwd_kernel(
    H, BIAS, OUT,  # h, out: (N, C); bias: (C,)
    N, C,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mask = (rows < N)[:, None] & col_ok[None, :]
    offs = rows[:, None] * C + cols[None, :]
    u = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32) + tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out, _ = _gelu_grad(u)
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(
    DOUT, H, BIAS, DH, DBIAS_P,  # dout, h, dh: (N, C); bias: (C,); partials: (T, C) fp32
    N, C, rows_per_prog,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, PREFETCH: tl.constexpr,
):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    bias = tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc = tl.full([BLOCK_C], 0.0, tl.float32)
    row_start = t.to(tl.int64) * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, N)
    h_next = _load_rows(H, t, 0, C, row_start + tl.arange(0, BLOCK_M), row_end, cols, col_ok)  # rows are global: N = 0
    d_next = _load_rows(DOUT, t, 0, C, row_start + tl.arange(0, BLOCK_M), row_end, cols, col_ok)
    for i in range(0, rows_per_prog, BLOCK_M):
        rows = row_start + i + tl.arange(0, BLOCK_M)
        if PREFETCH:  # issue the next tile's loads before this tile's math
            h, d = h_next, d_next
            h_next = _load_rows(H, t, 0, C, rows + BLOCK_M, row_end, cols, col_ok)
            d_next = _load_rows(DOUT, t, 0, C, rows + BLOCK_M, row_end, cols, col_ok)
        else:
            h = _load_rows(H, t, 0, C, rows, row_end, cols, col_ok)
            d = _load_rows(DOUT, t, 0, C, rows, row_end, cols, col_ok)
        mask = (rows < row_end)[:, None] & col_ok[None, :]
        _, grad = _gelu_grad(h.to(tl.float32) + bias[None, :])
        dh = tl.where(mask, d.to(tl.float32) * grad, 0.0)
        tl.store(DH + rows[:, None] * C + cols[None, :], dh.to(DH.dtype.element_ty), mask=mask)
        acc += _sum(dh, axis=0)
    tl.store(DBIAS_P + t.to(tl.int64) * C + cols, acc, mask=col_ok)


GELU_BWD_PROGRAMS_PER_SM = 4  # for column blocks of 1024: measured best of 2-32 on an H200 at DiT-B and DiT-XL widths


def gelu_bwd_programs_per_sm(C: int) -> int:
    """GELU_BWD_PROGRAMS_PER_SM for blocks of 1024 columns, more for narrower blocks, so that a program sums about as
    many elements (DiT-XL/2's 4608 in blocks of 512: 239 us a call at 8 per SM, 269 at 4, docs/benchmarks.md)."""
    return GELU_BWD_PROGRAMS_PER_SM * max(1, 1024 // _gelu_block_c(C))


_bias_gelu_fwd_tuned = _autotuned(_bias_gelu_fwd_kernel, GATE_CANDIDATES)
GELU_BWD_CANDIDATES = _candidates([dict(PREFETCH=False), dict(PREFETCH=True)])
_bias_gelu_bwd_tuned = _autotuned(_bias_gelu_bwd_kernel, GELU_BWD_CANDIDATES, BWD_KEY)


def bias_gelu_fwd(h: torch.Tensor, bias: torch.Tensor, config=None) -> torch.Tensor:
    """h: (N, C) contiguous, bias: (C,) -> tanh-GELU(h + bias) in h.dtype."""
    N, C = h.shape
    out = torch.empty_like(h)
    if N == 0:
        return out
    block_c = _gelu_block_c(C)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), triton.cdiv(C, block_c))  # noqa: E731
    _launch(_bias_gelu_fwd_kernel, _bias_gelu_fwd_tuned, grid, (h, bias, out, N, C), block_c, config, _heuristic(block_c, 2048, 16))
    return out


def bias_gelu_bwd_partials(dout: torch.Tensor, h: torch.Tensor, bias: torch.Tensor, config=None, rows_per_prog=None) -> tuple[torch.Tensor, torch.Tensor]:
    """dout, h: (N, C) contiguous -> dh (N, C) in h.dtype (the gradient of h + bias) and the (T, C) fp32 partials of
    dbias (sum over T)."""
    N, C = h.shape
    dh = torch.empty_like(h)
    if N == 0:
        return dh, torch.zeros(1, C, device=h.device, dtype=torch.float32)
    block_c = _gelu_block_c(C)
    n_cblocks = triton.cdiv(C, block_c)
    rows_per_prog = rows_per_prog or bias_gelu_bwd_rows(N, C, h.device)
    T = triton.cdiv(N, rows_per_prog)
    dbias_p = torch.empty(T, C, device=h.device, dtype=torch.float32)
    args = (dout, h, bias, dh, dbias_p, N, C, rows_per_prog)
    _launch(_bias_gelu_bwd_kernel, _bias_gelu_bwd_tuned, (T, n_cblocks), args, block_c, config, _heuristic(block_c, 2048, 16, PREFETCH=True))
    return dh, dbias_p


def bias_gelu_bwd_rows(N: int, C: int, device: torch.device) -> int:
    """Rows per program of bias_gelu_bwd_partials."""
    return bwd_rows_per_program(triton.cdiv(C, _gelu_block_c(C)), N, device, gelu_bwd_programs_per_sm(C))


def bias_gelu_bwd(dout: torch.Tensor, h: torch.Tensor, bias: torch.Tensor, config=None, rows_per_prog=None) -> tuple[torch.Tensor, torch.Tensor]:
    """dout, h: (N, C) contiguous -> dh (N, C) in h.dtype (the gradient of h + bias), dbias (C,) fp32."""
    dh, dbias_p = bias_gelu_bwd_partials(dout, h, bias, config, rows_per_prog)
    return dh, dbias_p.sum(0)


# ----------------------------------------------------------------------------- the qkv projection's gradient
# Rows are the M = samples x tokens of the qkv projection, columns its 3C outputs (q | k | v, each head by head). The
# attention's backward returns dq, dk, dv heads-major (B, H, N, d); this pass packs them into dqkv (M, 3C) for the
# projection's two GEMMs and sums the bias gradient over its rows (per-program partials (T, 3C), summed by torch),
# where autograd would stack them in one pass and read them again for the bias.


@triton.jit
def _qkv_grad_kernel(
    DQ, DK, DV,  # (B, H, N, D), strides (s_b, s_h, s_n, 1), the same for all three (cuDNN's: token-major, s_h = D)
    DQKV, DBIAS_P,  # (M, 3C) in the gradients' dtype, C = H D; partials (T, 3C) fp32
    N, C, M, s_b, s_h_aligned, s_n, rows_per_prog,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, ALIGN: tl.constexpr,
):
    """One program: rows_per_prog tokens of q, k or v, every head: dqkv's rows in two column tiles (`row_tiles`), read
    from the heads they belong to (column c: head c // D, element c % D; runs of D's power-of-two factor are
    contiguous in both, so the loads stay vectors), written as contiguous rows."""
    t = tl.program_id(0)
    part = tl.program_id(1)  # q | k | v: also the column block of dqkv
    if part == 0:
        src = DQ
    elif part == 1:
        src = DK
    else:
        src = DV
    cols = tl.arange(0, BLOCK_C)
    cols_t = BLOCK_C + tl.arange(0, BLOCK_T)
    col_ok, col_ok_t = cols < C, cols_t < C
    s_h = s_h_aligned * ALIGN  # token-major heads (s_h = D = 72, not a multiple of 16): passed / ALIGN, else 2-byte loads
    head_offs = (cols // D) * s_h + cols % D  # (BLOCK_C,) offset of column c in its head's (N, D) block
    head_offs_t = (cols_t // D) * s_h + cols_t % D
    DQKV += part * C
    acc, acc_t = tl.full([BLOCK_C], 0.0, tl.float32), tl.full([BLOCK_T], 0.0, tl.float32)
    row_start = t.to(tl.int64) * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    for i in range(0, rows_per_prog, BLOCK_M):
        rows = row_start + i + tl.arange(0, BLOCK_M)  # token b * N + n
        row_ok = rows < row_end
        b = rows // N
        row_offs = tl.multiple_of(b * s_b + (rows - b * N) * s_n, ALIGN)  # ALIGN elements = 16 bytes: vector loads
        mask, mask_t = row_ok[:, None] & col_ok[None, :], row_ok[:, None] & col_ok_t[None, :]
        g = tl.load(src + row_offs[:, None] + head_offs[None, :], mask=mask, other=0.0)
        g_t = tl.load(src + row_offs[:, None] + head_offs_t[None, :], mask=mask_t, other=0.0)
        tl.store(DQKV + rows[:, None] * (3 * C) + cols[None, :], g, mask=mask)
        tl.store(DQKV + rows[:, None] * (3 * C) + cols_t[None, :], g_t, mask=mask_t)
        acc += _sum(g.to(tl.float32), axis=0)
        acc_t += _sum(g_t.to(tl.float32), axis=0)
    p_row = t.to(tl.int64) * (3 * C) + part * C
    tl.store(DBIAS_P + p_row + cols, acc, mask=col_ok)
    tl.store(DBIAS_P + p_row + cols_t, acc_t, mask=col_ok_t)


QKV_PROGRAMS_PER_SM = 8  # XL's pack: 135 us with 1026 programs of 96 tokens, 152 with 384 of 256 (B/2's: 49 vs 101)
QKV_MAX_HEAD_DIM = 256
_qkv_grad_tuned = _autotuned(_qkv_grad_kernel, GATE_CANDIDATES, ("M", "C", "D", "rows_per_prog"))


def qkv_grad_rows(M: int, device: torch.device) -> int:
    """Tokens per program of qkv_grad_partials: about QKV_PROGRAMS_PER_SM programs per SM over q, k and v together, a
    multiple of _BWD_ROW_ALIGN (8 under the interpreter, so tests cover several programs)."""
    if INTERPRET:
        return 8
    return _rows_for(3 * M, _num_programs_target(device, QKV_PROGRAMS_PER_SM))


def qkv_grad_fills_the_gpu(M: int, device: torch.device) -> bool:
    """Whether the pack's programs fill 2 per SM: with fewer, autograd's stack stays (with 192 programs of 256 tokens,
    DiT-B/2's step ran 2% slower than with it; with 1026 of 48, 0.4% faster: docs/benchmarks.md)."""
    return 3 * partials_length(M, qkv_grad_rows(M, device)) >= _num_programs_target(device)


def qkv_grad_partials(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, config=None, rows_per_prog=None) -> tuple[torch.Tensor, torch.Tensor]:
    """dq, dk, dv: (B, H, N, D), D <= QKV_MAX_HEAD_DIM -> dqkv (B N, 3 H D) in dq.dtype, rows (sample, token),
    columns (q | k | v, head, d), and the (T, 3 H D) fp32 partials of its column sums (sum over T; T programs of
    rows_per_prog tokens, by default qkv_grad_rows)."""
    B, H, N, D = dq.shape
    M, C = B * N, H * D
    if dq.stride(-1) != 1 or not dq.stride() == dk.stride() == dv.stride():
        dq, dk, dv = dq.contiguous(), dk.contiguous(), dv.contiguous()
    dqkv = torch.empty(M, 3 * C, device=dq.device, dtype=dq.dtype)
    rows_per_prog = rows_per_prog or qkv_grad_rows(M, dq.device)
    T = partials_length(M, rows_per_prog)
    partials = torch.empty(T, 3 * C, device=dq.device, dtype=torch.float32)
    if M == 0 or C == 0:
        return dqkv, partials.zero_()
    vector = 16 // dq.element_size()  # elements of a 16-byte load, when every row starts on one (addresses: 16-aligned)
    align = vector if all(s % vector == 0 for s in dq.stride()[:3]) and all(t.data_ptr() % 16 == 0 for t in (dq, dk, dv)) else 1
    args = (dq, dk, dv, dqkv, partials, N, C, M, dq.stride(0), dq.stride(1) // align, dq.stride(2), rows_per_prog)
    bc, bt = row_tiles(C)
    _launch(_qkv_grad_kernel, _qkv_grad_tuned, (T, 3), args, bc, config, _heuristic(bc + bt, 4096, 16), D=D, BLOCK_T=bt, ALIGN=align)
    return dqkv, partials


# ----------------------------------------------------------------------------- AdamW on fp32 masters with bf16 copies


@triton.jit
def _adamw_block(
    P, G, M, V, COPY,  # fp32 master, its (bf16) gradient, fp32 moments, its bf16 copy: all (n,)
    S,  # fp32 (5,): lr, lr / bias_correction1, sqrt(bias_correction2), grad_scale, found_inf
    EMA,  # HAS_EMA: the fp32 EMA of P, moved towards the new P by ema_weight (1 - decay)
    offs, n, beta1, beta2, weight_decay, eps, ema_weight,
    HAS_EMA: tl.constexpr,
):
    """AdamW on the elements offs (< n) of one tensor."""
    mask = offs < n * (tl.load(S + 4) == 0.0).to(tl.int64)  # found_inf: nothing is read or written
    lr, step_size, bc2_sqrt, grad_scale = tl.load(S), tl.load(S + 1), tl.load(S + 2), tl.load(S + 3)
    p = tl.load(P + offs, mask=mask, other=0.0)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32) / grad_scale
    m = tl.load(M + offs, mask=mask, other=0.0)
    v = tl.load(V + offs, mask=mask, other=0.0)
    p = p - lr * weight_decay * p  # AdamW's decoupled decay, then Adam (torch's fused AdamW, in its order)
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    p = p - step_size * m / (tl.sqrt(v) / bc2_sqrt + eps)
    tl.store(P + offs, p, mask=mask)
    tl.store(M + offs, m, mask=mask)
    tl.store(V + offs, v, mask=mask)
    tl.store(COPY + offs, _to_bf16_rne(p), mask=mask)
    if HAS_EMA:  # torch's lerp for weights below 0.5: ema + w * (p - ema)
        e = tl.load(EMA + offs, mask=mask, other=0.0)
        tl.store(EMA + offs, e + ema_weight * (p - e), mask=mask)


@triton.jit
def _adamw_master_kernel(P, G, M, V, COPY, S, EMA, n, beta1, beta2, weight_decay, eps, ema_weight, BLOCK: tl.constexpr, HAS_EMA: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    _adamw_block(P, G, M, V, COPY, S, EMA, offs, n, beta1, beta2, weight_decay, eps, ema_weight, HAS_EMA)


@triton.jit
def _adamw_multi_kernel(
    TABLE,  # int64 (T, 8): per tensor, the addresses of P, G, M, V, COPY, EMA (16-byte aligned), then n, then 0
    BLOCKS,  # int32 (programs, 2): the tensor and the block of it that each program updates
    S, beta1, beta2, weight_decay, eps, ema_weight,
    G_DTYPE: tl.constexpr, BLOCK: tl.constexpr, HAS_EMA: tl.constexpr, N_ALIGNED: tl.constexpr,
):
    i = tl.program_id(0)
    row = TABLE + 8 * tl.load(BLOCKS + 2 * i).to(tl.int64)
    offs = tl.load(BLOCKS + 2 * i + 1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    P = tl.multiple_of(tl.load(row).to(tl.pointer_type(tl.float32)), 16)
    G = tl.multiple_of(tl.load(row + 1).to(tl.pointer_type(G_DTYPE)), 16)
    M = tl.multiple_of(tl.load(row + 2).to(tl.pointer_type(tl.float32)), 16)
    V = tl.multiple_of(tl.load(row + 3).to(tl.pointer_type(tl.float32)), 16)
    COPY = tl.multiple_of(tl.load(row + 4).to(tl.pointer_type(tl.bfloat16)), 16)
    EMA = tl.multiple_of(tl.load(row + 5).to(tl.pointer_type(tl.float32)), 16)
    n = tl.load(row + 6)
    if N_ALIGNED:  # every size a multiple of 16: the mask is constant over 16 elements, the loads vectorize
        n = tl.multiple_of(n, 16)
    _adamw_block(P, G, M, V, COPY, S, EMA, offs, n, beta1, beta2, weight_decay, eps, ema_weight, HAS_EMA)


@triton.jit
def _to_bf16_rne(x):
    """fp32 -> bf16 rounded to nearest even, as torch (autocast) rounds, written out: the interpreter truncates."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(x == x, bits, 0x7FC0).to(tl.uint16).to(tl.bfloat16, bitcast=True)  # NaN stays NaN


ADAMW_BLOCK, ADAMW_WARPS = 1024, 4  # elements per program, 8 per thread: the best of 1024-4096 x 4-16 warps (bench/adamw.py)


def adamw_master_(p, g, m, v, copy, scalars, beta1: float, beta2: float, weight_decay: float, eps: float, ema=None, ema_weight: float = 0.0,
                  block=None, warps=None) -> None:
    """One AdamW step of contiguous fp32 p, m, v from gradient g (any float dtype), writing p's bf16 copy too (and
    moving fp32 `ema` towards the new p by ema_weight, when given)."""
    n = p.numel()
    if n == 0:
        return
    if block is None:
        block, warps = adamw_block_size()
    args = (p, g, m, v, copy, scalars, p if ema is None else ema, n, beta1, beta2, weight_decay, eps, ema_weight)
    _adamw_master_kernel[(triton.cdiv(n, block),)](*args, BLOCK=block, HAS_EMA=ema is not None, num_warps=warps)


def adamw_block_size() -> tuple[int, int]:
    """(elements per program, warps) of the AdamW kernels: under the interpreter, tests still cover several programs
    and a masked tail, in seconds."""
    return (512, 1) if INTERPRET else (ADAMW_BLOCK, ADAMW_WARPS)


def adamw_multi_(table, blocks, scalars, beta1: float, beta2: float, weight_decay: float, eps: float, ema_weight: float, grad_dtype, has_ema: bool,
                 block: int, warps: int, sizes_aligned: bool) -> None:
    """One launch of AdamW over many tensors: `table` (T, 8) int64 of their addresses and sizes, `blocks` (programs, 2)
    int32 of (tensor, block) per program (kernels/adamw.py MultiTensorAdamW builds both); sizes_aligned: every size
    a multiple of 16 (the loads vectorize; the addresses must be 16-byte aligned in any case)."""
    g_dtype = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[grad_dtype]
    _adamw_multi_kernel[(blocks.shape[0],)](table, blocks, scalars, beta1, beta2, weight_decay, eps, ema_weight, G_DTYPE=g_dtype, BLOCK=block, HAS_EMA=has_ema,
                                            N_ALIGNED=sizes_aligned, num_warps=warps)
