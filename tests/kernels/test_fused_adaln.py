"""Fused adaLN (LayerNorm + modulate) and gate + residual kernels vs a float64 PyTorch reference.

On CPU the kernels run under TRITON_INTERPRET=1 (set in conftest.py); with CUDA the same tests run compiled.
"""

import pytest
import torch

from opendit.kernels import fused_adaln as fa
from close import assert_close_scaled  # tests/close.py

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Max error allowed, relative to the largest magnitude of the expected tensor: one final rounding to dtype.
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = ""):
    """Finite, same shape, and max |error| <= TOL[dtype] * max |expected| (scale-free)."""
    assert_close_scaled(actual, expected, TOL[dtype], what)


def leaves(*ts):
    """Detached copies that require grad."""
    return [t.detach().clone().requires_grad_() for t in ts]


def run_both(x, shift, scale, eps=1e-6):
    """Fused forward+backward on (x, shift, scale) and float64 reference on the same values; same random dy."""
    x, shift, scale = leaves(x, shift, scale)
    x64, shift64, scale64 = leaves(x.double(), shift.double(), scale.double())
    y = fa.FusedAdaLNFunction.apply(x, shift, scale, eps)
    dy = torch.randn_like(y)
    y.backward(dy)
    y64 = fa.layernorm_modulate_ref(x64, shift64, scale64, eps)
    y64.backward(dy.double())
    return (y, x.grad, shift.grad, scale.grad), (y64, x64.grad, shift64.grad, scale64.grad)


def check_all(x, shift, scale, eps=1e-6):
    """Forward, dx, dshift, dscale: dtypes as the inputs, values as the float64 reference."""
    got, ref = run_both(x, shift, scale, eps)
    for g, t in zip(got, (x, x, shift, scale)):
        assert g.dtype == t.dtype
    for name, g, r, dt in zip(("y", "dx", "dshift", "dscale"), got, ref, (x.dtype, x.dtype, shift.dtype, scale.dtype)):
        assert_close(g, r, dt, name)


def test_kernels_available():
    assert fa.is_available(DEVICE), "Triton kernels must run here (interpreter on CPU, compiled on CUDA)"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "shape",
    [(3, 13, 100), (4, 5, 72), (2, 3, 1152), (1, 7, 384), (2, 1, 64)],  # N not a multiple of the row block
)
def test_matches_fp64_reference(shape, dtype):
    B, N, C = shape
    x = torch.randn(B, N, C, device=DEVICE).to(dtype)
    shift = torch.randn(B, C, device=DEVICE).to(dtype)
    scale = (0.5 * torch.randn(B, C, device=DEVICE)).to(dtype)
    check_all(x, shift, scale)


def test_per_sample_modulation():
    """Each row uses the shift/scale of its own sample (row // N); sample 0's for all would fail."""
    B, N, C = 4, 5, 72
    x = torch.randn(B, N, C, device=DEVICE)
    shift = torch.randn(B, C, device=DEVICE) * torch.arange(1, B + 1, device=DEVICE)[:, None]
    scale = torch.randn(B, C, device=DEVICE)
    got, ref = run_both(x, shift, scale)
    for name, g, r in zip(("y", "dx", "dshift", "dscale"), got, ref):
        assert_close(g, r, torch.float32, name)
    # The bug of using the tile index (here: always sample 0) is far outside the tolerance.
    buggy = fa.layernorm_modulate_ref(x, shift[:1].expand(B, C), scale[:1].expand(B, C))
    for b in range(1, B):
        assert (buggy[b].double() - ref[0][b]).abs().max() > 100 * TOL[torch.float32] * ref[0].abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_large_magnitude_and_constant_rows(dtype):
    """x ~ 1e4 and rows with zero variance: finite, y == shift on constant rows, gradients as float64."""
    B, N, C = 2, 6, 100
    x = torch.randn(B, N, C, device=DEVICE) * 1e4
    x[0, 1] = 1e4  # constant rows: variance 0, rstd = 1/sqrt(eps)
    x[1, 4] = -3.0
    x[1, 0] = 0.0
    x = x.to(dtype)
    shift = torch.randn(B, C, device=DEVICE).to(dtype)
    scale = torch.randn(B, C, device=DEVICE).to(dtype)
    got, ref = run_both(x, shift, scale)
    for name, g, r in zip(("y", "dx", "dshift", "dscale"), got, ref):
        assert_close(g, r, dtype, name)
    const = torch.zeros(B, N, dtype=torch.bool, device=DEVICE)
    const[0, 1] = const[1, 4] = const[1, 0] = True
    assert_close(got[1][~const], ref[1][~const], dtype, "dx of non-constant rows (~1e-4, own scale)")
    assert_close(got[1][const], ref[1][const], dtype, "dx of constant rows (~1e3, own scale)")
    y = got[0]
    for b, n in const.nonzero().tolist():
        assert torch.equal(y[b, n], shift[b]), "constant rows normalise to exactly 0"


def test_saved_mean_rstd():
    B, N, C = 2, 5, 100
    x = torch.randn(B, N, C, device=DEVICE) * 3 + 7
    y, mean, rstd = fa._ops.adaln_fwd(x, torch.zeros(B, C, device=DEVICE), torch.zeros(B, C, device=DEVICE), 1e-6)
    x64 = x.double().reshape(B * N, C)
    assert_close(mean, x64.mean(-1), torch.float32, "mean")
    assert_close(rstd, (x64.var(-1, unbiased=False) + 1e-6).rsqrt(), torch.float32, "rstd")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_noncontiguous_chunks(dtype):
    """shift/scale as chunks of a (B, 6C) adaLN projection; gradients reach the projection output."""
    B, N, C = 3, 5, 72
    x = torch.randn(B, N, C, device=DEVICE).to(dtype)
    mod = torch.randn(B, 6 * C, device=DEVICE).to(dtype)
    (x1, mod1), (x2, mod2) = leaves(x, mod), leaves(x.double(), mod.double())
    shift, scale = mod1.chunk(6, dim=1)[:2]
    assert not shift.is_contiguous()
    y = fa.fused_layernorm_modulate(x1, shift, scale)
    dy = torch.randn_like(y)
    y.backward(dy)
    y64 = fa.layernorm_modulate_ref(x2, *mod2.chunk(6, dim=1)[:2])
    y64.backward(dy.double())
    assert_close(y, y64, dtype, "y")
    assert_close(x1.grad, x2.grad, dtype, "dx")
    assert_close(mod1.grad[:, : 2 * C], mod2.grad[:, : 2 * C], dtype, "dmod")
    assert (mod1.grad[:, 2 * C :] == 0).all()


def test_fp32_modulation_with_bf16_x_and_extra_dims():
    """shift/scale in fp32 with x in bf16; x of shape (B, T, S, C); (B, 1, C) modulation like DiT's unsqueeze."""
    B, T, S, C = 2, 3, 2, 100
    x = torch.randn(B, T, S, C, device=DEVICE).to(torch.bfloat16)
    check_all(x, torch.randn(B, C, device=DEVICE), torch.randn(B, C, device=DEVICE))
    shift, scale = torch.randn(B, 1, C, device=DEVICE), torch.randn(B, 1, C, device=DEVICE)
    check_all(x[:, 0], shift, scale)


def test_bad_shapes_raise():
    x = torch.randn(2, 3, 8, device=DEVICE)
    with pytest.raises(ValueError):
        fa.fused_layernorm_modulate(x, torch.randn(3, 8, device=DEVICE), torch.randn(2, 8, device=DEVICE))


def test_reference_rounds_once():
    """The reference computes in fp32 and rounds once: equal to the fp64 result rounded to bf16 up to 1 ulp."""
    x = torch.randn(2, 4, 64).to(torch.bfloat16)
    shift, scale = torch.randn(2, 64), torch.randn(2, 64)
    ref = fa.layernorm_modulate_ref(x, shift, scale)
    ref64 = fa.layernorm_modulate_ref(x.double(), shift.double(), scale.double())
    assert ref.dtype == torch.bfloat16
    assert_close(ref, ref64, torch.bfloat16)


# ----------------------------------------------------------------------------- gate + residual


def gate_both(x, gate, y):
    (x1, g1, y1), (x2, g2, y2) = leaves(x, gate, y), leaves(x.double(), gate.double(), y.double())
    out = fa.GateResidualFunction.apply(x1, g1, y1)
    dout = torch.randn_like(out)
    out.backward(dout)
    out64 = fa.gate_residual_ref(x2, g2, y2)
    out64.backward(dout.double())
    return (out, x1.grad, g1.grad, y1.grad), (out64, x2.grad, g2.grad, y2.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 13, 100), (2, 3, 1152)])
def test_gate_residual(shape, dtype):
    B, N, C = shape
    x, y = torch.randn(B, N, C, device=DEVICE).to(dtype), torch.randn(B, N, C, device=DEVICE).to(dtype)
    gate = torch.randn(B, 3 * C, device=DEVICE).to(dtype).chunk(3, dim=1)[2]  # non-contiguous, per sample
    got, ref = gate_both(x, gate, y)
    for name, g, r, t in zip(("out", "dx", "dgate", "dy"), got, ref, (x, x, gate, y)):
        assert g.dtype == t.dtype, name
        assert_close(g, r, dtype, name)


def test_gate_residual_mixed_dtypes():
    """fp32 residual stream, bf16 branch output and gate: fp32 result, gradients in each input's dtype."""
    B, N, C = 2, 5, 72
    x = torch.randn(B, N, C, device=DEVICE)
    y = torch.randn(B, N, C, device=DEVICE).to(torch.bfloat16)
    gate = torch.randn(B, C, device=DEVICE).to(torch.bfloat16)
    got, ref = gate_both(x, gate, y)
    assert got[0].dtype == torch.float32
    for name, g, r, t in zip(("out", "dx", "dgate", "dy"), got, ref, (x, x, gate, y)):
        assert g.dtype == t.dtype, name
        assert_close(g, r, t.dtype, name)


# ----------------------------------------------------------------------------- gate + residual, then adaLN


def gate_adaln_both(x, gate, y, shift, scale):
    """(out, h, dx, dgate, dy, dshift, dscale) of the fused op and of the float64 references, same random gradients."""
    ins, ins64 = leaves(x, gate, y, shift, scale), leaves(*(t.double() for t in (x, gate, y, shift, scale)))
    out, h = fa.GateResidualAdaLNFunction.apply(*ins, 1e-6)
    dout, dh = torch.randn_like(out), torch.randn_like(h)
    torch.autograd.backward([out, h], [dout, dh])
    x64, g64, y64, sh64, sc64 = ins64
    out64 = fa.gate_residual_ref(x64, g64, y64)
    h64 = fa.layernorm_modulate_ref(out64, sh64, sc64)
    torch.autograd.backward([out64, h64], [dout.double(), dh.double()])
    return (out, h, *(t.grad for t in ins)), (out64, h64, *(t.grad for t in ins64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 13, 100), (2, 3, 1152)])
def test_gate_residual_adaln(shape, dtype):
    """x + gate * y and LN(.) * (1 + scale) + shift in one op: both outputs and all five gradients (adaLN chunks)."""
    B, N, C = shape
    x, y = torch.randn(B, N, C, device=DEVICE).to(dtype), torch.randn(B, N, C, device=DEVICE).to(dtype)
    _, _, gate, shift, scale, _ = torch.randn(B, 6 * C, device=DEVICE).to(dtype).chunk(6, dim=1)  # non-contiguous rows
    got, ref = gate_adaln_both(x, gate, y, shift, scale)
    for name, g, r, t in zip(("out", "h", "dx", "dgate", "dy", "dshift", "dscale"), got, ref, (x, x, x, gate, y, shift, scale)):
        assert g.dtype == t.dtype, name
        assert_close(g, r, dtype, name)


def test_gate_residual_adaln_mixed_dtypes_and_fallback():
    """fp32 residual stream with a bf16 branch: fp32 out and h, each gradient in its input's dtype; and fp64 (the
    PyTorch fallback) gives what the two separate functions give."""
    B, N, C = 2, 5, 72
    x = torch.randn(B, N, C, device=DEVICE)
    y, gate, shift, scale = (torch.randn(*s, device=DEVICE).to(torch.bfloat16) for s in ((B, N, C), (B, C), (B, C), (B, C)))
    got, ref = gate_adaln_both(x, gate, y, shift, scale)
    assert got[0].dtype == got[1].dtype == torch.float32
    for name, g, r, t in zip(("out", "h", "dx", "dgate", "dy", "dshift", "dscale"), got, ref, (x, x, x, gate, y, shift, scale)):
        assert g.dtype == t.dtype, name
        assert_close(g, r, t.dtype, name)
    x64, gate64, y64, shift64, scale64 = (t.double() for t in (x, gate, y, shift, scale))
    out, h = fa.gate_residual_layernorm_modulate(x64, gate64, y64, shift64, scale64)
    torch.testing.assert_close(out, fa.gate_residual_ref(x64, gate64, y64))
    torch.testing.assert_close(h, fa.layernorm_modulate_ref(out, shift64, scale64))


def boundary_case(B, N, C, with_bias, dtype=torch.float32):
    """The boundary launchers' inputs (x, gate, y, shift, scale, bias, dout, dh) and the float64 reference's out, h
    and gradients in the launchers' order (dx, dy, dgate, dscale, dshift, then dbias)."""
    x, y, dout, dh = (torch.randn(B, N, C, device=DEVICE).to(dtype) for _ in range(4))
    gate, shift, scale = (torch.randn(B, C, device=DEVICE).to(dtype) for _ in range(3))
    bias = torch.randn(C, device=DEVICE).to(dtype) if with_bias else None
    ins64 = leaves(*(t.double() for t in (x, gate, y, shift, scale) + ((bias,) if with_bias else ())))
    out64 = fa.gate_residual_ref(ins64[0], ins64[1], ins64[2] + ins64[5] if with_bias else ins64[2])
    h64 = fa.layernorm_modulate_ref(out64, *ins64[3:5])
    torch.autograd.backward([out64, h64], [dout.double(), dh.double()])
    grads64 = [ins64[i].grad for i in (0, 2, 1, 4, 3, 5)[: 5 + with_bias]]
    return (x, gate, y, shift, scale, bias, dout, dh), (out64, h64, grads64)


def check_boundary(case, dtype, what, config=None, rows_per_prog=6):
    """The boundary launchers (with `config`, or the default: autotuned Triton, or Gluon on CUDA) against the float64
    reference; returns their out, h and gradients."""
    ops = fa._ops
    (x, gate, y, shift, scale, bias, dout, dh), (out64, h64, grads64) = case
    out, h, mean, rstd = ops.gate_res_adaln_fwd(x, gate, y, shift, scale, 1e-6, dtype, config=config, bias=bias)
    assert_close(out, out64, dtype, f"out {what}")
    assert_close(h, h64, dtype, f"h {what}")
    grads = ops.gate_res_adaln_bwd(dout, dh, out, y, gate, scale, mean, rstd, dtype, config=config, rows_per_prog=rows_per_prog, bias=bias)
    assert len(grads) == len(grads64)
    for name, g, g64 in zip(("dx", "dy", "dgate", "dscale", "dshift", "dbias"), grads, grads64):
        assert_close(g, g64, dtype, f"{name} {what}")
    return (out, h, *grads)


@pytest.mark.parametrize("with_bias", [False, True])
def test_gate_residual_adaln_launchers(with_bias):
    """Explicit configs: several row tiles per program and per sample, masked tails (fp32 against float64); with a
    bias, y + bias goes into the residual and the bias's gradient is summed over every row of every sample."""
    case = boundary_case(2, 13, 72, with_bias)
    for cfg in (dict(BLOCK_M=2, num_warps=1), dict(BLOCK_M=4, num_warps=1)):
        check_boundary(case, torch.float32, str(cfg), config=cfg)


def test_gluon_tiles_and_rows_per_program(monkeypatch):
    """Gluon's boundary kernels take DiT's widths as two exact tiles in 16-byte vectors (BLOCK_C / 256 warps) and leave
    the rest (powers of two among them), the CPU and explicit configs to Triton; their backward's rows per program aim at 8 warps per SM (GPU rule on
    132 SMs): DiT-B/2 at batch 64 sums 32 rows a program, DiT-XL/2 at batch 128 keeps Triton's 128."""
    ops = fa._ops
    if ops._gluon is None:
        pytest.skip("triton without Gluon")
    split = ops._gluon.split
    assert (split(1152), split(768), split(384), split(4608)) == ((1024, 128, 4), (512, 256, 2), (256, 128, 1), (4096, 512, 16))
    assert split(1024) is None and split(72) is None and split(96) is None and split(1000) is None
    monkeypatch.setattr(ops, "GLUON", True)
    monkeypatch.setattr(ops, "INTERPRET", False)
    monkeypatch.setattr(ops, "_num_programs_target", lambda device, per_sm=2: per_sm * 132)
    cuda = torch.device("cuda")
    assert ops._gluon_tiles(1152, cuda) == (1024, 128, 4)
    assert ops._gluon_tiles(1152, torch.device("cpu")) is None and ops._gluon_tiles(1152, cuda, dict(BLOCK_M=2, num_warps=4)) is None
    assert ops.boundary_bwd_rows(128, 256, 1152, cuda) == ops.bwd_rows_per_program(128, 256, cuda) == 128
    assert ops.boundary_bwd_rows(64, 256, 768, cuda) == 32
    assert ops.boundary_bwd_rows(64, 256, 72, cuda) == ops.bwd_rows_per_program(64, 256, cuda) == 64
    monkeypatch.setattr(ops, "GLUON", False)
    assert ops._gluon_tiles(1152, cuda) is None and ops.boundary_bwd_rows(64, 256, 768, cuda) == 64


# ----------------------------------------------------------------------------- GPU only


@gpu
@needs_cuda
def test_large_bf16_gpu():
    """DiT-XL/2-like shape on GPU: bf16 forward and gradients vs the float64 reference."""
    B, N, C = 256, 256, 1152
    x = torch.randn(B, N, C, device="cuda").to(torch.bfloat16)
    shift, scale = torch.randn(B, C, device="cuda").to(torch.bfloat16), torch.randn(B, C, device="cuda").to(
        torch.bfloat16
    )
    check_all(x, shift, scale)


@gpu
@needs_cuda
def test_large_gate_residual_bf16_gpu():
    B, N, C = 64, 1024, 1152
    x, y = torch.randn(B, N, C, device="cuda").to(torch.bfloat16), torch.randn(B, N, C, device="cuda").to(
        torch.bfloat16
    )
    gate = torch.randn(B, C, device="cuda").to(torch.bfloat16)
    got, ref = gate_both(x, gate, y)
    for name, g, r in zip(("out", "dx", "dgate", "dy"), got, ref):
        assert_close(g, r, torch.bfloat16, name)


@gpu
@needs_cuda
def test_cpu_tensor_falls_back_on_gpu_machine():
    x = torch.randn(2, 3, 8)
    shift, scale = torch.randn(2, 8), torch.randn(2, 8)
    torch.testing.assert_close(fa.fused_layernorm_modulate(x, shift, scale), fa.layernorm_modulate_ref(x, shift, scale))


def check_configs(B, N, C, fwd_configs, bwd_configs, gate_configs, rows_per_prog=None):
    """Run the launchers with explicit configs on fp32 inputs; compare with the float64 reference."""
    ops = fa._ops
    x = torch.randn(B, N, C, device=DEVICE)
    shift, scale, dy = torch.randn(B, C, device=DEVICE), torch.randn(B, C, device=DEVICE), torch.randn_like(x)
    x64, shift64, scale64 = leaves(x.double(), shift.double(), scale.double())
    y64 = fa.layernorm_modulate_ref(x64, shift64, scale64)
    y64.backward(dy.double())
    for cfg in fwd_configs:
        y, mean, rstd = ops.adaln_fwd(x, shift, scale, 1e-6, config=cfg)
        assert_close(y, y64, torch.float32, f"y {cfg}")
    for cfg in bwd_configs:
        dx, dscale, dshift = ops.adaln_bwd(dy, x, scale, mean, rstd, config=cfg, rows_per_prog=rows_per_prog)
        for name, a, r in (("dx", dx, x64.grad), ("dshift", dshift, shift64.grad), ("dscale", dscale, scale64.grad)):
            assert_close(a, r, torch.float32, f"{name} {cfg}")
    g = torch.randn(B, C, device=DEVICE)
    for cfg in gate_configs:
        out = ops.gate_res_fwd(x, g, dy, torch.float32, config=cfg)
        d_y, dgate = ops.gate_res_bwd(dy, g, x, config=cfg)
        assert_close(out, x.double() + g.double()[:, None] * dy.double(), torch.float32, f"gate out {cfg}")
        assert_close(d_y, dy.double() * g.double()[:, None], torch.float32, f"gate dy {cfg}")
        assert_close(dgate, (dy.double() * x.double()).sum(1), torch.float32, f"gate dgate {cfg}")


def test_row_tiles_cover_the_row():
    """A row as two power-of-two column tiles (the GELU + float8 and qkv gradient kernels): DiT's widths exactly."""
    ops = fa._ops
    widths = {1152: (1024, 128), 768: (512, 256), 384: (256, 128), 1024: (512, 512), 4608: (4096, 512), 3072: (2048, 1024)}
    for C, tiles in widths.items():
        assert ops.row_tiles(C) == tiles
    assert ops.row_tiles(300) == (256, 64) and ops.row_tiles(72) == (64, 8) and ops.row_tiles(1) == (1, 1)


def test_gelu_column_blocks_divide_the_row(monkeypatch):
    """The bias + GELU kernels' column block (GPU rule) divides DiT's MLP widths: no masked block."""
    ops = fa._ops
    monkeypatch.setattr(ops, "INTERPRET", False)
    for C, block in {4608: 512, 3072: 1024, 4096: 1024, 1536: 512, 1152: 128, 100: 128, 48: 64}.items():
        assert ops._gelu_block_c(C) == block


def test_kernel_variants():
    """Row-tile loops with and without prefetch, several tiles per program and per sample, masked tails."""
    fwd = [dict(BLOCK_M=4, num_warps=1, TILES=1, PREFETCH=False), dict(BLOCK_M=2, num_warps=1, TILES=3, PREFETCH=True)]
    bwd = [dict(BLOCK_M=4, num_warps=1, PREFETCH=False), dict(BLOCK_M=2, num_warps=1, PREFETCH=True)]
    check_configs(2, 13, 72, fwd, bwd, [dict(BLOCK_M=2, num_warps=1)], rows_per_prog=6)


@gpu
@needs_cuda
@pytest.mark.parametrize("C", [72, 1152])
def test_every_config_gpu(C):
    """Every autotune candidate that passes the pruning gives the right forward and backward."""
    ops = fa._ops
    ok = lambda c, bc: ops._tile_ok(c["BLOCK_M"], bc, c["num_warps"])  # noqa: E731
    bc = ops.triton.next_power_of_2(C)
    fwd = [c for c in ops.FWD_CANDIDATES if ok(c, bc)]
    bwd = [c for c in ops.BWD_CANDIDATES if ok(c, bc)]
    gate = [c for c in ops.GATE_CANDIDATES if ok(c, ops._gate_block_c(C))]
    assert len(fwd) >= 4 and len(bwd) >= 2 and len(gate) >= 2
    check_configs(3, 37, C, fwd, bwd, gate)


@gpu
@needs_cuda
@pytest.mark.parametrize("C", [768, 1152])
def test_gate_residual_adaln_gpu(C):
    """DiT-B/XL widths in bf16 (autotuned) against float64, then every pruned autotune candidate in fp32."""
    B, N = 32, 256
    x, y = torch.randn(B, N, C, device="cuda").bfloat16(), torch.randn(B, N, C, device="cuda").bfloat16()
    gate, shift, scale = (torch.randn(B, C, device="cuda").bfloat16() for _ in range(3))
    got, ref = gate_adaln_both(x, gate, y, shift, scale)
    for name, g, r in zip(("out", "h", "dx", "dgate", "dy", "dshift", "dscale"), got, ref):
        assert_close(g, r, torch.bfloat16, name)
    ops = fa._ops
    configs = [c for c in ops.GATE_CANDIDATES if ops._tile_ok(c["BLOCK_M"], ops.triton.next_power_of_2(C), c["num_warps"])]
    assert len(configs) >= 2
    x, y, dout, dh = (torch.randn(3, 37, C, device="cuda") for _ in range(4))
    gate, shift, scale = (torch.randn(3, C, device="cuda") for _ in range(3))
    ins64 = leaves(*(t.double() for t in (x, gate, y, shift, scale)))
    out64 = fa.gate_residual_ref(*ins64[:3])
    h64 = fa.layernorm_modulate_ref(out64, *ins64[3:])
    torch.autograd.backward([out64, h64], [dout.double(), dh.double()])
    for cfg in configs:
        out, h, mean, rstd = ops.gate_res_adaln_fwd(x, gate, y, shift, scale, 1e-6, torch.float32, config=cfg)
        assert_close(h, h64, torch.float32, f"h {cfg}")
        grads = ops.gate_res_adaln_bwd(dout, dh, out, y, gate, scale, mean, rstd, torch.float32, config=cfg)
        for name, g, t in zip(("dx", "dy", "dgate", "dscale", "dshift"), grads, [ins64[i] for i in (0, 2, 1, 4, 3)]):
            assert_close(g, t.grad, torch.float32, f"{name} {cfg}")


@gpu
@needs_cuda
@pytest.mark.parametrize("C", [384, 768, 1152])
def test_boundary_gluon_gpu(C):
    """Gluon's boundary kernels (the CUDA default at these widths) against float64, fp32 and bf16, with and without a
    bias, with rows per program that BLOCK_M does not divide and a partial last program; and against the Triton
    kernels on the same inputs, up to each one's last rounding."""
    ops = fa._ops
    if not ops.GLUON:
        pytest.skip("Gluon kernels off: triton < 3.6 or OPENDIT_GLUON=0")
    assert ops._gluon_tiles(C, torch.device("cuda")) is not None
    for dtype in (torch.float32, torch.bfloat16):
        for with_bias in (False, True):
            case = boundary_case(3, 37, C, with_bias, dtype)
            for rows in (6, 16, None):
                got = check_boundary(case, dtype, f"Gluon {dtype} bias={with_bias} rows={rows}", rows_per_prog=rows)
            ref = check_boundary(case, dtype, f"Triton {dtype}", config=dict(BLOCK_M=2, num_warps=4), rows_per_prog=None)
            for name, g, r in zip(("out", "h", "dx", "dy", "dgate", "dscale", "dshift", "dbias"), got, ref):
                assert_close(g, r.double(), dtype, f"{name}: Gluon against Triton, {dtype} bias={with_bias}")


@pytest.mark.parametrize("B, N, C", [(2, 37, 24), (3, 0, 16), (1, 260, 1152)])
def test_backward_ops_fake_shapes_match_the_kernels(B, N, C):
    """The backward custom ops return per-program partials whose length depends on N and the rows per program (an
    argument, so that the compiled graph holds it): what torch.compile's fake tensors announce must be what the kernels
    return (opcheck's fake-tensor test)."""
    from opendit.kernels import fused_gelu  # noqa: F401 (registers the GELU ops)

    torch.manual_seed(0)
    bf = dict(device=DEVICE, dtype=torch.bfloat16)
    x, y, d, d2 = (torch.randn(B, N, C, **bf) for _ in range(4))
    mod = [torch.randn(B, C, device=DEVICE) for _ in range(3)]
    _, mean, rstd = fa._ops.adaln_fwd(x, mod[0], mod[1], 1e-6)
    ops, dev, rows = fa._COMPILED, torch.device(DEVICE), fa._ops.bwd_rows_per_program(B, N, torch.device(DEVICE))
    cases = {
        "adaln_bwd_partials": (d, x, mod[1], mean, rstd, rows),
        "gate_res_bwd_partials": (d, mod[2], y, fa._ops.gate_res_bwd_rows(B, N, C, dev)),
        "gate_res_adaln_bwd_partials": (d, d2, x, y, mod[2], mod[1], mean, rstd, torch.bfloat16, rows),
        "gate_res_adaln_bwd_partials with a bias": (d, d2, x, y, mod[2], mod[1], mean, rstd, torch.bfloat16, rows, torch.randn(C, **bf)),
        "bias_gelu_bwd_partials": (d.reshape(B * N, C), x.reshape(B * N, C), torch.randn(C, **bf), fa._ops.bias_gelu_bwd_rows(B * N, C, dev)),
        "gate_res_adaln_bwd_partials with other rows": (d, d2, x, y, mod[2], mod[1], mean, rstd, torch.bfloat16, 16),
    }
    for name, args in cases.items():
        torch.library.opcheck(ops[name.split(" ")[0]], args, test_utils=("test_faketensor",))


@pytest.mark.parametrize("B, N", [(128, 256), (64, 256), (256, 256), (3, 37), (100, 1024), (512, 256)])
def test_backward_programs_fill_at_most_one_wave(monkeypatch, B, N):
    """Rows per backward program (GPU rule): every row covered, B * T programs within one wave of the 2-per-SM target
    where B allows it (DiT-XL/2 at batch 128 on 132 SMs: 256 programs, not 384 in one and a half waves)."""
    ops = fa._ops
    monkeypatch.setattr(ops, "INTERPRET", False)
    monkeypatch.setattr(ops, "_num_programs_target", lambda device, per_sm=2: per_sm * 132)
    rows = ops.bwd_rows_per_program(B, N, torch.device("cpu"))
    T = ops.bwd_programs(B, N, torch.device("cpu"))
    assert rows % ops._BWD_ROW_ALIGN == 0 and T * rows >= N > (T - 1) * rows
    assert B * T <= max(264, B)
