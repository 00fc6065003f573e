"""The MLP with fc1's GELU in quack's GEMM epilogues vs a float64 reference, compiled and in a DiT block; the switch's
fallbacks on CPU. The GPU tests need a Hopper GPU with quack-kernels installed, and skip otherwise."""

import pytest
import torch
import torch.nn.functional as F

from opendit.kernels import quack_mlp as qm
from opendit.models.blocks import DiTBlock, KernelChoice, Mlp, quack_fits, without_bias
from opendit.parallel.parallelize import use_quack_mlp
from close import assert_close_scaled  # tests/close.py

AVAILABLE = torch.cuda.is_available() and qm.is_available(torch.empty(0, device="cuda"))
needs_quack = pytest.mark.skipif(not AVAILABLE, reason="needs a Hopper GPU with quack-kernels installed")
gpu = pytest.mark.gpu
TOL = 1.5e-2  # bf16: the pre-activation, the activation and each GEMM's output rounded once


def counted_quack_mm(monkeypatch) -> list:
    """quack's plain GEMM wherever the kernels call it, counted; and qkv_heads on its fused path at any size."""
    from opendit.kernels import fused_qkv as fq

    calls, quack_mm = [], qm.quack_mm
    monkeypatch.setattr(qm, "quack_mm", lambda *a: calls.append(1) or quack_mm(*a))
    monkeypatch.setattr(fq._ops, "qkv_grad_fills_the_gpu", lambda M, device: True)
    return calls


def reference(x, w1, b1, w2, dz):
    """float64 (z, dx, dw1, db1, dw2) of fc2's GEMM of gelu_tanh(x w1^T + b1)."""
    leaves = [t.detach().double().requires_grad_() for t in (x, w1, b1, w2)]
    z = F.gelu(leaves[0] @ leaves[1].t() + leaves[2], approximate="tanh") @ leaves[3].t()
    z.backward(dz.double())
    return (z.detach(), *(t.grad for t in leaves))


def run(fn, x, w1, b1, w2, dz):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w1, b1, w2)]
    z = fn(*leaves)
    z.backward(dz)
    return (z.detach(), *(t.grad for t in leaves))


def inputs(rows=2048, c=384, hidden=1536, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(rows, c, generator=g, device="cuda").to(torch.bfloat16)
    w1 = (torch.randn(hidden, c, generator=g, device="cuda") / c ** 0.5).to(**bf16)
    b1 = (torch.randn(hidden, generator=g, device="cuda") * 0.5).to(**bf16)
    w2 = (torch.randn(c, hidden, generator=g, device="cuda") / hidden ** 0.5).to(**bf16)
    dz = torch.randn(rows, c, generator=g, device="cuda").to(torch.bfloat16)
    return x, w1, b1, w2, dz


@gpu
@needs_quack
@pytest.mark.parametrize("compiled,gemms", [(False, ""), (True, ""), (False, "fwd+dgrad+wgrad"), (True, "dgrad")])
def test_quack_mlp_matches_float64(compiled, gemms):
    args = inputs()
    fn = torch.compile(qm.quack_mlp, fullgraph=True) if compiled else qm.quack_mlp
    got, ref = run(lambda *t: fn(*t, gemms=gemms), *args), reference(*args)
    for name, a, e in zip(("z", "dx", "dw1", "db1", "dw2"), got, ref):
        assert a.dtype == torch.bfloat16, name
        assert_close_scaled(a, e, TOL, name)


@gpu
@needs_quack
@pytest.mark.parametrize("gemms", ["", "fwd+dgrad"])
def test_dit_block_with_quack_mlp_matches_triton_gelu(gemms, monkeypatch):
    """The fused-boundaries block with and without quack (its epilogues, and with gemms its plain GEMMs in qkv, proj and
    the MLP too, as parallelize sets them): the same output and gradients within bf16 noise."""
    calls = counted_quack_mm(monkeypatch)
    torch.manual_seed(0)
    block = DiTBlock(384, 6, kernels=KernelChoice(fused_adaln=True, fused_gelu=True, fused_boundaries=True, fused_qkv_grad=True,
                                                  quack_gemms=gemms)).cuda()
    for p in block.parameters():
        p.data.normal_(0, 0.05)
    x = torch.randn(4, 256, 384, device="cuda")
    mod, next_mod = torch.randn(4, 6 * 384, device="cuda"), torch.randn(4, 2 * 384, device="cuda")
    results = []
    for quack in (False, True):
        block.kernels.quack_mlp = quack
        block.zero_grad()
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, h = block(xi, None, mod=mod, next_mod=next_mod)
        ((out.float() ** 2).mean() + (h.float() ** 2).mean()).backward()
        results.append([out.float(), h.float(), xi.grad] + [p.grad.clone() for p in block.parameters() if p.grad is not None])
    for i, (a, e) in enumerate(zip(*results)):
        assert_close_scaled(a, e, 2 * TOL, f"tensor {i}")
    assert len(calls) == (6 if gemms else 0)  # forward: qkv, proj, fc2; input gradients: fc1, proj, qkv


@gpu
@needs_quack
@pytest.mark.parametrize("gemms", ["fwd+dgrad+wgrad", "fwd+dgrad"])
def test_quack_linear_matches_float64(gemms):
    x, w, _, _, dy = inputs(hidden=384)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w)]
    y = qm.quack_linear(*leaves, gemms)
    y.backward(dy)
    ref = [t.detach().double().requires_grad_() for t in (x, w)]
    y_ref = ref[0] @ ref[1].t()
    y_ref.backward(dy.double())
    for name, a, e in zip(("y", "dx", "dw"), (y.detach(), leaves[0].grad, leaves[1].grad), (y_ref.detach(), ref[0].grad, ref[1].grad)):
        assert_close_scaled(a, e, TOL, name)


def test_mlp_falls_back_off_gpu_and_in_fp32():
    """quack_mlp set but the input on CPU (or on a GPU: fp32 or fp16, or widths that are not 16-byte rows): fc2 without
    its bias, as without_bias gives it."""
    mlp = Mlp(16, 64, KernelChoice(quack_mlp=True))
    x = torch.randn(2, 8, 16)
    y, bias = mlp.without_out_bias(x)
    y0, bias0 = without_bias(mlp.fc2, mlp.hidden(x))
    assert torch.equal(y, y0) and bias is mlp.fc2.bias and bias0 is mlp.fc2.bias


def test_use_quack_mlp_off_gpu_when_disabled_and_when_its_check_fails(monkeypatch):
    model = Mlp(16, 64)
    assert not use_quack_mlp(model)  # CPU weights
    monkeypatch.setattr(qm, "is_available", lambda t: True)
    monkeypatch.setattr(qm, "self_test", lambda device: None)
    assert use_quack_mlp(model)
    monkeypatch.setattr(qm, "self_test", lambda device: "its output differs from PyTorch's by 1.0e+00 of the largest value")
    with pytest.warns(UserWarning, match=r"^quack-kernels is installed but its MLP path fails its check on this GPU \(its output differs"):
        assert not use_quack_mlp(model)
    monkeypatch.setenv("OPENDIT_QUACK", "0")
    assert not use_quack_mlp(model)


def test_self_test_reports_a_failure_in_one_line():
    """Where quack cannot run (here: no quack, or a CPU tensor), the check says why instead of raising."""
    problem = qm.self_test(torch.device("cpu"))
    assert problem and "\n" not in problem


@gpu
@needs_quack
def test_self_test_passes_on_hopper():
    assert qm.self_test(torch.device("cuda")) is None


@gpu
@needs_quack
@pytest.mark.parametrize("dtype,width", [(torch.float16, 64), (torch.bfloat16, 60)])
def test_mlp_keeps_cublas_for_fp16_and_unaligned_widths(dtype, width, monkeypatch):
    monkeypatch.setattr(qm, "quack_mlp", lambda *a, **k: pytest.fail("quack ran"))
    mlp = Mlp(width, 4 * width, KernelChoice(quack_mlp=True)).cuda()
    with torch.autocast("cuda", dtype=dtype):
        y, bias = mlp.without_out_bias(torch.randn(2, 8, width, device="cuda"))
    assert bias is mlp.fc2.bias and y.shape == (2, 8, width)


@gpu
@needs_quack
@pytest.mark.parametrize("gemms", ["fwd+dgrad+wgrad", "dgrad"])
def test_qkv_heads_with_quack_gemms_matches_float64(gemms, monkeypatch):
    """The qkv projection's fused backward with its GEMMs as quack's, under bf16 autocast: q, k, v and the three
    gradients against float64."""
    from opendit.kernels import qkv_heads, qkv_heads_ref

    calls = counted_quack_mm(monkeypatch)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4, 512, 384, generator=g, device="cuda")
    w, b = torch.randn(3 * 384, 384, generator=g, device="cuda") / 384 ** 0.5, torch.randn(3 * 384, generator=g, device="cuda")
    dqkv = [torch.randn(4, 6, 512, 64, generator=g, device="cuda").bfloat16() for _ in range(3)]
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        qkv = qkv_heads(*leaves, 6, gemms)
    torch.autograd.backward(qkv, dqkv)
    ref = [t.double().requires_grad_() for t in (x, w, b)]
    qkv_ref = qkv_heads_ref(*ref, 6)
    torch.autograd.backward(qkv_ref, [d.double() for d in dqkv])
    for name, a, e in zip(("q", "k", "v", "dx", "dw", "db"), [*qkv, *(t.grad for t in leaves)], [*qkv_ref, *(t.grad for t in ref)]):
        assert_close_scaled(a, e, TOL, name)
    assert len(calls) == len(gemms.split("+"))


def test_quack_fits_only_bf16_cuda_autograd_and_16_byte_rows():
    linear = torch.nn.Linear(16, 64)
    assert not quack_fits(torch.randn(2, 16, dtype=torch.bfloat16), linear)  # CPU
    if torch.cuda.is_available():
        x = torch.randn(2, 16, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert quack_fits(x, linear)
            assert not quack_fits(x, linear, torch.nn.Linear(64, 60))
            with torch.no_grad():
                assert not quack_fits(x, linear)
        with torch.autocast("cuda", dtype=torch.float16):
            assert not quack_fits(x, linear)
        assert not quack_fits(x, linear)  # fp32
