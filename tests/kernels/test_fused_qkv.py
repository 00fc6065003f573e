"""The qkv projection's fused backward (dq, dk, dv packed, the bias gradient summed in one pass) vs float64 PyTorch,
and the Attention switch that uses it.

On CPU the kernel runs under TRITON_INTERPRET=1 (set in conftest.py); with CUDA the same tests run compiled.
"""

import pytest
import torch

from opendit.kernels import fused_qkv as fq
from opendit.models.attention import Attention
from opendit.models.blocks import DiTBlock, KernelChoice
from close import assert_close_scaled  # tests/close.py

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def heads(B, H, N, D, dtype, heads_major=True):
    """dq, dk, dv (B, H, N, D): contiguous heads-major as cuDNN returns them, or token-major views."""
    shape = (B, H, N, D) if heads_major else (B, N, H, D)
    g = [torch.randn(shape, device=DEVICE).to(dtype) for _ in range(3)]
    return g if heads_major else [t.transpose(1, 2) for t in g]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 2, 5, 8), (3, 4, 7, 24), (1, 3, 33, 72), (2, 3, 4, 6)])  # row tails; head dims 72, 6
@pytest.mark.parametrize("heads_major", [True, False])
def test_pack_and_bias_sum_match_the_reference(shape, dtype, heads_major):
    dq, dk, dv = heads(*shape, dtype, heads_major)
    dqkv, partials = fq._ops.qkv_grad_partials(dq, dk, dv)
    ref, ref_sum = fq.qkv_grad_ref(dq.double(), dk.double(), dv.double())
    assert dqkv.dtype == dtype and dqkv.shape == ref.shape and partials.dtype == torch.float32
    assert torch.equal(dqkv.double(), ref)  # a copy: exact
    assert_close_scaled(partials.sum(0), ref_sum, 2e-6, "dbias")  # fp32 sums of dtype values


def test_launcher_configs():
    """Several row tiles per program, a masked row tail, a masked column tail, each head of q, k and v."""
    dq, dk, dv = heads(2, 3, 11, 12, torch.float32)  # rows of 36 in tiles of 32 and 4
    ref, ref_sum = fq.qkv_grad_ref(dq.double(), dk.double(), dv.double())
    for cfg in (dict(BLOCK_M=2, num_warps=1), dict(BLOCK_M=4, num_warps=1), dict(BLOCK_M=16, num_warps=1)):
        dqkv, partials = fq._ops.qkv_grad_partials(dq, dk, dv, config=cfg)
        assert torch.equal(dqkv.double(), ref), cfg
        assert_close_scaled(partials.sum(0), ref_sum, 2e-6, f"dbias {cfg}")


def gradients(fn, x, w, b, dout):
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    q, k, v = fn(x, w, b, 4)
    (q * dout[0] + k * dout[1] + v * dout[2]).sum().backward()
    return (q, k, v), (x.grad, w.grad, b.grad)


def test_function_matches_autograd_in_float64():
    """QkvHeadsFunction (fp32 values) against autograd's split in float64: the same q, k, v and gradients."""
    x, w, b = torch.randn(2, 9, 12, device=DEVICE), torch.randn(96, 12, device=DEVICE), torch.randn(96, device=DEVICE)
    dout = torch.randn(3, 2, 4, 9, 8, device=DEVICE)
    got = gradients(lambda *args: fq.QkvHeadsFunction.apply(*args, ""), x, w, b, dout)
    ref = gradients(fq.qkv_heads_ref, x.double(), w.double(), b.double(), dout.double())
    for name, g, r in zip(("q", "k", "v", "dx", "dw", "db"), got[0] + got[1], ref[0] + ref[1]):
        assert g.dtype == torch.float32, name
        assert_close_scaled(g, r, 1e-5, name)


def test_under_autocast_gradients_keep_the_weights_dtype():
    """bf16 autocast with fp32 weights: bf16 q, k, v; fp32 gradients for x, weight and bias, near autocast's own."""
    x, w, b = torch.randn(2, 9, 16, device=DEVICE), torch.randn(96, 16, device=DEVICE), torch.randn(96, device=DEVICE)
    dout = torch.randn(3, 2, 4, 9, 8, device=DEVICE).bfloat16()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got = gradients(fq.qkv_heads, x, w, b, dout)
        ref = gradients(fq.qkv_heads_ref, x, w, b, dout)
    assert all(t.dtype == torch.bfloat16 for t in got[0]) and all(t.dtype == torch.float32 for t in got[1])
    for name, g, r in zip(("q", "k", "v", "dx", "dw", "db"), got[0] + got[1], ref[0] + ref[1]):
        assert_close_scaled(g.float(), r.float(), 1e-2, name)


def test_fallbacks_take_the_reference(monkeypatch):
    x = torch.randn(2, 3, 8, device=DEVICE, dtype=torch.float64, requires_grad=True)
    q, _, _ = fq.qkv_heads(x, torch.randn(24, 8, device=DEVICE, dtype=torch.float64), torch.randn(24, device=DEVICE, dtype=torch.float64), 2)
    assert q.grad_fn is not None and "QkvHeads" not in type(q.grad_fn).__name__
    x = torch.randn(2, 3, 8, device=DEVICE, requires_grad=True)  # heads of 264: wider than the kernel's tile
    q, _, _ = fq.qkv_heads(x, torch.randn(3 * 264, 8, device=DEVICE), torch.randn(3 * 264, device=DEVICE), 1)
    assert "QkvHeads" not in type(q.grad_fn).__name__
    x = torch.randn(2, 9, 8, device=DEVICE, requires_grad=True)
    q, _, _ = fq.qkv_heads(x, torch.randn(36, 8, device=DEVICE), torch.randn(36, device=DEVICE), 2)  # heads of 6: the kernel
    assert "QkvHeads" in type(q.grad_fn).__name__
    programs = fq._ops.partials_length(18, fq._ops.qkv_grad_rows(18, torch.device(DEVICE)))
    monkeypatch.setattr(fq._ops, "_num_programs_target", lambda device, per_sm=2: 4 * 3 * programs)
    q, _, _ = fq.qkv_heads(x, torch.randn(36, 8, device=DEVICE), torch.randn(36, device=DEVICE), 2)  # too few programs
    assert "QkvHeads" not in type(q.grad_fn).__name__


def test_fills_the_gpu_rule(monkeypatch):
    """GPU rule (132 SMs): about 8 programs per SM of 16-token multiples (DiT-XL/2 at batch 128: 96 tokens each, 1026
    programs; DiT-B/2 at batch 64: 48 each); a batch too small to give 2 per SM keeps autograd's stack."""
    monkeypatch.setattr(fq._ops, "INTERPRET", False)
    monkeypatch.setattr(fq._ops, "_num_programs_target", lambda device, per_sm=2: per_sm * 132)
    cpu = torch.device("cpu")
    assert [fq._ops.qkv_grad_rows(M, cpu) for M in (128 * 256, 64 * 256, 2 * 256)] == [96, 48, 16]
    assert fq._ops.qkv_grad_fills_the_gpu(128 * 256, cpu) and fq._ops.qkv_grad_fills_the_gpu(64 * 256, cpu)
    assert not fq._ops.qkv_grad_fills_the_gpu(2 * 256, cpu)


@pytest.mark.parametrize("rows", [None, 16])
def test_fake_shapes_match_the_kernel(rows):
    """The custom op's partials length comes from its rows-per-program argument (which the compiled graph holds, so a
    new rule is a new inductor cache key): what fake tensors announce is what the kernel returns."""
    dq, dk, dv = (torch.randn(2, 3, 40, 8, device=DEVICE, dtype=torch.bfloat16) for _ in range(3))
    rows = rows or fq._ops.qkv_grad_rows(2 * 40, torch.device(DEVICE))
    torch.library.opcheck(fq._COMPILED["qkv_grad_partials"], (dq, dk, dv, rows), test_utils=("test_faketensor",))
    assert fq._ops.qkv_grad_partials(dq, dk, dv, rows_per_prog=rows)[1].shape == (fq._ops.partials_length(80, rows), 72)


def always_the_kernel(monkeypatch) -> list:
    """qkv_heads takes the kernel at any size (a GPU keeps autograd's below 2 programs per SM); returns its calls."""
    calls, apply = [], fq.QkvHeadsFunction.apply
    monkeypatch.setattr(fq._ops, "qkv_grad_fills_the_gpu", lambda M, device: True)
    monkeypatch.setattr(fq.QkvHeadsFunction, "apply", lambda *a: calls.append(1) or apply(*a))
    return calls


def test_block_switch_matches_the_plain_block(monkeypatch):
    """A DiT block on the fused-boundaries path with fused_qkv_grad: the output and every gradient of the plain one."""
    calls = always_the_kernel(monkeypatch)
    torch.manual_seed(0)
    kernels = KernelChoice(fused_boundaries=True)
    plain, fused = DiTBlock(32, 2, kernels=kernels).to(DEVICE), DiTBlock(32, 2, kernels=KernelChoice(fused_boundaries=True, fused_qkv_grad=True)).to(DEVICE)
    for p in plain.parameters():
        p.data.normal_(0, 0.1)
    fused.load_state_dict(plain.state_dict())
    x, mod, next_mod = torch.randn(2, 5, 32, device=DEVICE), torch.randn(2, 192, device=DEVICE), torch.randn(2, 64, device=DEVICE)
    outs = []
    for block in (plain, fused):
        x_out, h = block(x, None, mod, next_mod=next_mod)
        (x_out.square().sum() + h.sin().sum()).backward()
        outs.append([x_out, h] + [p.grad for p in block.parameters()])
    assert type(fused.attn) is Attention and len(calls) == 1  # the kernel ran, in the fused block only
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_compiles_without_graph_breaks(monkeypatch):
    always_the_kernel(monkeypatch)
    attn = Attention(32, num_heads=2).to(DEVICE)
    x = torch.randn(2, 5, 32, device=DEVICE, requires_grad=True)
    expected = attn.attend(x, fused_qkv_grad=True)
    torch._dynamo.reset()
    got = torch.compile(lambda t: attn.attend(t, fused_qkv_grad=True), fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, expected)
    got.sum().backward()
    assert x.grad is not None and attn.qkv.bias.grad is not None


@gpu
@needs_cuda
def test_dit_xl_shape_bf16_gpu():
    """DiT-XL/2's attention gradients at batch 16 (16 heads of 72 over 256 tokens), bf16, autotuned."""
    dq, dk, dv = heads(16, 16, 256, 72, torch.bfloat16)
    dqkv, partials = fq._ops.qkv_grad_partials(dq, dk, dv)
    ref, ref_sum = fq.qkv_grad_ref(dq.double(), dk.double(), dv.double())
    assert torch.equal(dqkv.double(), ref)
    assert_close_scaled(partials.sum(0), ref_sum, 2e-6, "dbias")
