"""Bias + tanh GELU kernels (training) vs a float64 PyTorch reference, and the Mlp switch that uses them.

On CPU the kernels run under TRITON_INTERPRET=1 (set in conftest.py); with CUDA the same tests run compiled.
"""

import pytest
import torch
import torch.nn.functional as F

from opendit.kernels import fused_gelu as bg
from opendit.models.blocks import KernelChoice, Mlp
from close import assert_close_scaled  # tests/close.py

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Max |error| relative to the largest |expected|: one rounding to the dtype (the interpreter truncates: 1 ulp of bf16).
TOL = {torch.float32: 2e-6, torch.bfloat16: 8e-3}
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str):
    assert actual.dtype == dtype, what
    assert_close_scaled(actual, expected, TOL[dtype], what)


def both(h: torch.Tensor, bias: torch.Tensor, dout: torch.Tensor, fn=bg.bias_gelu):
    """(out, dh, dbias) of `fn` and of float64 GELU(h + bias) on the same values."""
    h1, b1 = h.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    out = fn(h1, b1)
    out.backward(dout)
    h2, b2 = h.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    ref = F.gelu(h2 + b2, approximate="tanh")
    ref.backward(dout.double())
    return (out, h1.grad, b1.grad), (ref.detach(), h2.grad, b2.grad)


def check(shape, dtype, fn=bg.bias_gelu):
    h = (3 * torch.randn(shape, device=DEVICE)).to(dtype)  # reaches both tails of the GELU
    bias, dout = torch.randn(shape[-1], device=DEVICE), torch.randn(shape, device=DEVICE).to(dtype)
    got, ref = both(h, bias, dout, fn)
    for name, g, r, dt in zip(("out", "dh", "dbias"), got, ref, (dtype, dtype, torch.float32)):
        assert_close(g, r, dt, name)


def test_kernels_run_here():
    assert bg.is_available(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 40), (3, 5, 130), (33, 1100)])  # rows and columns not multiples of the tiles
def test_matches_fp64_reference(shape, dtype):
    check(shape, dtype)


def test_extreme_inputs_stay_finite_and_exact():
    """Large |u|: GELU(u) = u or 0 and its derivative 1 or 0, with no overflow in the exponential."""
    h = torch.tensor([[-1e4, -60.0, -10.0, 0.0, 10.0, 60.0, 1e4]], device=DEVICE)
    got, ref = both(h, torch.zeros(7, device=DEVICE), torch.ones_like(h))
    for name, g, r in zip(("out", "dh", "dbias"), got, ref):
        torch.testing.assert_close(g.double(), r, atol=1e-6, rtol=1e-6, msg=name)


def test_launcher_configs():
    """Several row tiles per backward program, a masked row tail, several column tiles."""
    ops = bg._ops
    h, bias, dout = torch.randn(13, 150, device=DEVICE), torch.randn(150, device=DEVICE), torch.randn(13, 150, device=DEVICE)
    u = (h.double() + bias.double()).requires_grad_()
    ref = F.gelu(u, approximate="tanh")
    ref.backward(dout.double())
    for cfg in (dict(BLOCK_M=2, num_warps=1), dict(BLOCK_M=4, num_warps=1)):
        assert_close(ops.bias_gelu_fwd(h, bias, config=cfg), ref.detach(), torch.float32, f"out {cfg}")
    for cfg in (dict(BLOCK_M=2, num_warps=1, PREFETCH=True), dict(BLOCK_M=4, num_warps=1, PREFETCH=False)):
        dh, dbias = ops.bias_gelu_bwd(dout, h, bias, config=cfg, rows_per_prog=6)
        assert_close(dh, u.grad, torch.float32, f"dh {cfg}")
        assert_close(dbias, u.grad.sum(0), torch.float32, f"dbias {cfg}")


def test_float64_and_mismatched_bias_use_the_reference():
    h = torch.randn(4, 8, dtype=torch.float64, device=DEVICE)
    torch.testing.assert_close(bg.bias_gelu(h, torch.ones(8, dtype=torch.float64, device=DEVICE)), F.gelu(h + 1, approximate="tanh"))
    h32 = torch.randn(4, 8, device=DEVICE)
    torch.testing.assert_close(bg.bias_gelu(h32, torch.ones(1, device=DEVICE)), F.gelu(h32 + 1, approximate="tanh"))


def test_mlp_switch_matches_plain_mlp():
    """Mlp with fused_gelu: same output and parameter gradients as without, in training; unchanged under no_grad."""
    plain = Mlp(24, 96).to(DEVICE)
    fused = Mlp(24, 96, KernelChoice(fused_gelu=True)).to(DEVICE)
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(2, 5, 24, device=DEVICE)
    outs = []
    for m in (plain, fused):
        out = m(x)
        out.square().sum().backward()
        outs.append((out, *[p.grad for p in m.parameters()]))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x))


def test_mlp_switch_compiles_without_graph_breaks():
    m = Mlp(16, 64, KernelChoice(fused_gelu=True)).to(DEVICE)
    x = torch.randn(2, 3, 16, device=DEVICE)
    expected = m(x)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(m, fullgraph=True, backend="aot_eager")(x), expected)


@gpu
@needs_cuda
def test_large_bf16_gpu():
    """DiT-XL/2's fc1 output at batch 32 (8192 rows x 4608), bf16, autotuned."""
    check((8192, 4608), torch.bfloat16)


@gpu
@needs_cuda
def test_every_config_gpu():
    """Every autotune candidate that passes the pruning gives the right forward and backward (fp32, DiT-B's width)."""
    ops = bg._ops
    C = 3072
    ok = [c for c in ops.GELU_BWD_CANDIDATES if ops._tile_ok(c["BLOCK_M"], ops._gelu_block_c(C), c["num_warps"])]
    assert len(ok) >= 4
    h, bias, dout = torch.randn(1000, C, device=DEVICE), torch.randn(C, device=DEVICE), torch.randn(1000, C, device=DEVICE)
    u = (h.double() + bias.double()).requires_grad_()
    F.gelu(u, approximate="tanh").backward(dout.double())
    for cfg in ok:
        dh, dbias = ops.bias_gelu_bwd(dout, h, bias, config=cfg)
        assert_close(dh, u.grad, torch.float32, f"dh {cfg}")
        assert_close(dbias, u.grad.sum(0), torch.float32, f"dbias {cfg}")
