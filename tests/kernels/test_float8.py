"""Float8 GEMMs: the scaled GEMM equals float64 maths on the rounded operands, the rounding is e4m3's, the Triton
GELU + row-quantize kernel (two column tiles a row) equals a float64 reference, and to_float8 swaps exactly the blocks'
GEMMs."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from opendit.kernels import _triton_ops, fused_adaln
from opendit.kernels.float8 import E4M3, E4M3_MAX, Float8Linear, Float8Mlp, gelu_quantize_rows, quantize_rows, to_float8
from opendit.models import DiT, Latte
from opendit.models.blocks import KernelChoice, Mlp

FLOAT8_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not FLOAT8_GPU, reason="needs a CUDA GPU with float8 GEMMs (compute capability 8.9+)")])]


def _dequantized_reference(layer: Float8Linear, x: torch.Tensor) -> torch.Tensor:
    """float64: (rounded x * its row scales) @ (rounded W * its channel scales)^T + b."""
    x_q, x_scale = quantize_rows(x.reshape(-1, layer.in_features))
    w = layer.weight_q.double() * layer.weight_scale.double().t()  # (N, K)
    y = (x_q.double() * x_scale.double()) @ w.t() + layer.bias.double()
    return y.view(*x.shape[:-1], layer.out_features)


def test_quantize_rows_rounds_like_e4m3():
    x = torch.randn(64, 128, dtype=torch.float64) * torch.logspace(-3, 3, 64, dtype=torch.float64)[:, None]  # rows of very different size
    x[3] = 0  # an all-zero row: zero out, no NaN
    q, scale = quantize_rows(x)
    back = q.double() * scale.double()
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64, 1)
    assert torch.equal(back[3], x[3])
    assert torch.allclose(back.abs().amax(1)[x.abs().amax(1) > 0], x.abs().amax(1)[x.abs().amax(1) > 0], rtol=1e-6)  # each row's max maps to 448
    assert (q.float().abs().amax(1)[x.abs().amax(1) > 0] == E4M3_MAX).all()
    normal = x.abs() > scale.double() * 2**-6  # e4m3's normal range: 3 mantissa bits, relative error <= 2^-4
    rel = ((back - x).abs() / x.abs())[normal]
    assert rel.max() <= 2**-4 + 1e-12 and rel.max() > 2**-6  # really rounded, and not more than e4m3 rounds


@pytest.mark.parametrize("device", DEVICES)
def test_linear_equals_float64_on_the_rounded_operands(device):
    torch.manual_seed(0)
    linear = nn.Linear(256, 96).to(device)
    layer = Float8Linear(linear)
    x = torch.randn(3, 40, 256, device=device).to(torch.bfloat16)
    with torch.no_grad():
        y = layer(x)
        exact = linear.double()(x.double())
    ref = _dequantized_reference(layer, x)
    assert y.dtype == torch.bfloat16 and y.shape == (3, 40, 96)
    assert torch.allclose(y.double(), ref, rtol=2**-7, atol=2**-7 * ref.abs().max().item() / 16)  # bf16 output rounding only
    rel = ((y.double() - exact).norm() / exact.norm()).item()
    assert 0.005 < rel < 0.06, rel  # e4m3's rounding of both operands, no more


def _e4m3_neighbours(v: torch.Tensor) -> torch.Tensor:
    """For float64 values already in e4m3's range: the two nearest e4m3 values (below, above), as float64."""
    q = v.to(E4M3).double()
    step = torch.where(v.abs() >= 2**-6, 2.0 ** (torch.floor(torch.log2(v.abs().clamp(min=2**-6))) - 3), torch.full_like(v, 2.0**-9))
    below = torch.where(q <= v, q, q - step)
    return below, torch.where(q >= v, q, q + step)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
@pytest.mark.parametrize("shape", [(7, 300), (5, 4608), (3, 256)])
def test_gelu_quantize_kernel_equals_float64(device, shape):
    """The Triton pass (the interpreter on the CPU) against float64: same row scales, each value one of the two e4m3
    neighbours of GELU(h) / scale, and nearly always the nearest (fp32 vs float64 ties aside)."""
    assert fused_adaln.is_available(device)  # the kernel runs, not the PyTorch fallback
    torch.manual_seed(0)
    h = (torch.randn(*shape, dtype=torch.float64) * torch.logspace(-2, 2, shape[0], dtype=torch.float64)[:, None]).to(torch.bfloat16).to(device)
    h[1] = 0  # an all-zero row: zero out, no NaN
    h[2, :3] = torch.tensor([-40.0, 60.0, -0.5])  # far tails of the GELU
    h[0, -1] = 90.0  # a row's maximum in the last column: in the tail tile
    q, scale = gelu_quantize_rows(h)
    g = F.gelu(h.double().cpu(), approximate="tanh")  # (M, K) float64
    ref_scale = g.abs().amax(1, keepdim=True).clamp(min=1e-12) / E4M3_MAX
    assert q.dtype == E4M3 and q.shape == h.shape and scale.dtype == torch.float32 and scale.shape == (shape[0], 1)
    assert torch.allclose(scale.double().cpu(), ref_scale, rtol=1e-6, atol=0)
    assert torch.equal(q[1].float().cpu(), torch.zeros(shape[1]))
    exact = (g / scale.double().cpu()).clamp(-E4M3_MAX, E4M3_MAX)
    below, above = _e4m3_neighbours(exact)
    got = q.double().cpu()
    assert ((got == below) | (got == above)).all()
    assert (got == exact.to(E4M3).double()).double().mean() > 0.999


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
@pytest.mark.parametrize("config", _triton_ops.GELU_CONFIGS)
def test_gelu_quantize_configs_agree(device, config):
    """Every config the launcher may autotune to gives the same bits (per-element maths; a max does not depend on order)."""
    torch.manual_seed(0)
    h = torch.randn(11, 4608, device=device).to(torch.bfloat16) * 3
    q, scale = _triton_ops.gelu_quantize(h, config=config)
    q_ref, scale_ref = gelu_quantize_rows(h)
    assert torch.equal(scale, scale_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


def test_float8_mlp_equals_float64_on_the_rounded_operands():
    torch.manual_seed(0)
    mlp = Mlp(64, 256)
    f8 = Float8Mlp(mlp)
    x = torch.randn(2, 9, 64).to(torch.bfloat16)
    with torch.no_grad():
        y = f8(x)
        h = f8.fc1(x).reshape(-1, 256)  # bf16 pre-activation, as the layer makes it
        g_q, g_scale = quantize_rows(F.gelu(h.double(), approximate="tanh"))
        w2 = f8.fc2.weight_q.double() * f8.fc2.weight_scale.double().t()
        ref = ((g_q.double() * g_scale.double()) @ w2.t() + f8.fc2.bias.double()).view(2, 9, 64)
        exact = mlp.double()(x.double())
    assert y.dtype == torch.bfloat16 and y.shape == (2, 9, 64)
    assert torch.allclose(y.double(), ref, rtol=2**-7, atol=2**-6 * ref.abs().max().item())
    rel = ((y.double() - exact).norm() / exact.norm()).item()
    assert 0.005 < rel < 0.08, rel


def test_to_float8_swaps_the_block_gemms_only():
    model = DiT(depth=2, hidden_size=64, num_heads=2, input_size=8, num_classes=10).eval()
    assert to_float8(model) == 2 * 3
    for block in model.blocks:
        assert isinstance(block.attn.qkv, Float8Linear) and isinstance(block.mlp, Float8Mlp)
        assert all(isinstance(m, Float8Linear) for m in (block.mlp.fc1, block.mlp.fc2))
        assert type(block.attn.proj) is nn.Linear  # skipped by default: no faster in float8 at sampling sizes
        assert type(block.adaLN_modulation[1]) is nn.Linear
    model = DiT(depth=1, hidden_size=64, num_heads=2, input_size=8, num_classes=10).eval()
    assert to_float8(model, fast_accum=True, skip=()) == 4 and model.blocks[0].attn.proj.fast_accum
    assert type(model.final_layer.linear) is nn.Linear and type(model.t_embedder.mlp[0]) is nn.Linear


def test_to_float8_keeps_sizes_the_gemm_cannot_take():
    model = DiT(depth=1, hidden_size=40, num_heads=2, input_size=8, num_classes=10)  # 40 is not a multiple of 16
    assert to_float8(model) == 0
    block = model.blocks[0]
    assert type(block.mlp) is Mlp
    assert all(type(m) is nn.Linear for m in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2))


@pytest.mark.parametrize("cls", [DiT, Latte])
def test_model_output_close_to_bf16(cls):
    torch.manual_seed(0)
    kw = dict(depth=2, hidden_size=64, num_heads=2, num_classes=10, input_size=8)
    model = (cls(num_frames=2, in_channels=4, **kw) if cls is Latte else cls(**kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 4, 2, 8, 8) if cls is Latte else torch.randn(2, 4, 8, 8)
    t, y = torch.tensor([10, 500]), torch.tensor([1, 3])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(x, t, y).float()
        to_float8(model)
        out = model(x, t, y).float()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.05, rel


def test_mlp_epilogue_switch_leaves_float8_fc1_alone():
    mlp = Mlp(64, 256, KernelChoice(gelu_epilogue=True))
    mlp.fc1, mlp.fc2 = Float8Linear(mlp.fc1), Float8Linear(mlp.fc2)
    x = torch.randn(2, 8, 64)
    with torch.no_grad():
        assert torch.equal(mlp(x), mlp.fc2(mlp.act(mlp.fc1(x))))


@pytest.mark.gpu
@pytest.mark.skipif(not FLOAT8_GPU, reason="needs a CUDA GPU with float8 GEMMs (compute capability 8.9+)")
@pytest.mark.parametrize("fast_accum", [False, True])
def test_compiled_model_with_epilogue_switch_on_matches_eager(fast_accum):
    """On the GPU with sample.py's switches (GELU epilogue on, whole model compiled): the MLPs stay float8 (the Triton
    GELU + quantize pass inside the compiled graph) and the compiled forward matches the eager one."""
    torch.manual_seed(0)
    model = DiT(depth=2, hidden_size=128, num_heads=2, input_size=8, num_classes=10).cuda().eval()
    model.kernels.gelu_epilogue = True
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.05 * torch.randn_like(p))
    to_float8(model, fast_accum=fast_accum)
    x, t, y = torch.randn(4, 4, 8, 8, device="cuda"), torch.tensor([1, 10, 100, 999], device="cuda"), torch.tensor([0, 1, 2, 3], device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        eager = model(x, t, y).float()
        compiled = torch.compile(model)(x, t, y).float()
    assert torch.allclose(compiled, eager, rtol=0.02, atol=0.02 * eager.abs().max().item())
