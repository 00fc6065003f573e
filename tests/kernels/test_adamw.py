"""AdamW on fp32 masters with bf16 copies (kernels/adamw.py) vs a float64 reference, and against torch's fused AdamW.

On CPU the kernel runs under TRITON_INTERPRET=1 (set in conftest.py); with CUDA the same tests run compiled.
"""
import pytest
import torch

from opendit.kernels import adamw
from close import assert_close_scaled  # tests/close.py

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HYPER = dict(beta1=0.9, beta2=0.999, weight_decay=0.1, eps=1e-8)


def assert_rounded(copy: torch.Tensor, p: torch.Tensor):
    """copy == p rounded to nearest even, as autocast rounds (the kernel rounds by hand: the interpreter would truncate)."""
    assert torch.equal(copy, p.to(torch.bfloat16))


def tensors(n: int, grad_dtype: torch.dtype):
    """p, g, m, v (m, v from a few earlier steps) and a bf16 copy of p."""
    p = torch.randn(n, device=DEVICE)
    g = (0.1 * torch.randn(n, device=DEVICE)).to(grad_dtype)
    m = 0.01 * torch.randn(n, device=DEVICE)
    v = 1e-4 * torch.rand(n, device=DEVICE)
    return p, g, m, v, p.to(torch.bfloat16)


def scalars(step: float, grad_scale: float = 1.0, found_inf: float = 0.0, lr: float = 1e-3) -> torch.Tensor:
    dev = lambda x: torch.tensor(x, device=DEVICE)  # noqa: E731
    return adamw.adamw_scalars(lr, dev(step), HYPER["beta1"], HYPER["beta2"], dev(grad_scale), dev(found_inf))


@pytest.mark.parametrize("n", [1, 2048 + 37, 70_001])
@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float32])
def test_adamw_master_matches_float64(n, grad_dtype):
    p, g, m, v, copy = tensors(n, grad_dtype)
    ref = [t.double() for t in (p, g, m, v)]
    s = scalars(step=3, grad_scale=2.5)
    adamw.adamw_master_(p, g, m, v, copy, s, **HYPER)
    adamw.adamw_master_ref(*ref, torch.empty_like(ref[0]), s.double(), **HYPER)
    for got, want, what in ((p, ref[0], "p"), (m, ref[2], "exp_avg"), (v, ref[3], "exp_avg_sq")):
        assert_close_scaled(got, want, 2e-6, what)
    assert_rounded(copy, p)


def test_adamw_master_with_the_ema_matches_float64():
    p, g, m, v, copy = tensors(3000, torch.bfloat16)
    ema = p + 0.01 * torch.randn_like(p)
    ref = [t.double() for t in (p, g, m, v, ema)]
    adamw.adamw_master_(p, g, m, v, copy, scalars(step=4), **HYPER, ema=ema, ema_weight=1e-2)
    adamw.adamw_master_ref(*ref[:4], torch.empty_like(ref[0]), scalars(step=4).double(), **HYPER, ema=ref[4], ema_weight=1e-2)
    assert_close_scaled(p, ref[0], 2e-6, "p")
    assert_close_scaled(ema, ref[4], 2e-6, "ema")
    assert_rounded(copy, p)


def test_adamw_master_skips_everything_on_found_inf():
    p, g, m, v, copy = tensors(5000, torch.bfloat16)
    ema = p.clone()
    before = [t.clone() for t in (p, m, v, copy, ema)]
    adamw.adamw_master_(p, g, m, v, copy, scalars(step=1, found_inf=1.0), **HYPER, ema=ema, ema_weight=0.5)
    for got, want in zip((p, m, v, copy, ema), before):
        assert torch.equal(got, want)


def test_adamw_master_matches_torch_fused_adamw():
    """Three steps from bf16 gradients with a clip divisor: the masters and moments torch's fused AdamW reaches from
    the same gradients in fp32 (fp32 rounding apart), the step counted as it counts."""
    n = 10_000
    p, _, _, _, copy = tensors(n, torch.bfloat16)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    torch_p = torch.nn.Parameter(p.clone())
    opt = torch.optim.AdamW([torch_p], lr=1e-3, betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"], weight_decay=HYPER["weight_decay"], fused=True)
    for step in (1, 2, 3):
        g = torch.randn(n, device=DEVICE).to(torch.bfloat16)
        divisor = torch.tensor(1.0 + step, device=DEVICE)
        adamw.adamw_master_(p, g, m, v, copy, scalars(step, grad_scale=float(divisor)), **HYPER)
        torch_p.grad = g.float()
        opt.grad_scale, opt.found_inf = divisor, torch.zeros((), device=DEVICE)
        opt.step()
    state = opt.state[torch_p]
    assert float(state["step"]) == 3
    for got, want, what in ((p, torch_p.detach(), "p"), (m, state["exp_avg"], "exp_avg"), (v, state["exp_avg_sq"], "exp_avg_sq")):
        assert_close_scaled(got, want, 1e-6, what)


def test_non_contiguous_tensors_take_the_reference():
    p, g, m, v, copy = tensors(64, torch.bfloat16)
    p2 = torch.randn(64, 2, device=DEVICE)[:, 0].copy_(p)  # strided view
    adamw.adamw_master_(p2, g, m.clone(), v.clone(), copy, scalars(2), **HYPER)
    adamw.adamw_master_ref(p, g, m, v, torch.empty_like(copy), scalars(2), **HYPER)
    assert_close_scaled(p2, p, 1e-6, "p")


SIZES = [1, 600, 2048 + 37, 5000]  # one block, a partial block, several blocks with a masked tail
ALIGNED = [16, 2048, 4096 + 48]  # every size a multiple of 16: the kernel's vectorized variant


def many(with_ema: bool, sizes: list = SIZES) -> list:
    """(p, g, m, v, copy, ema or None) per size."""
    return [tensors(n, torch.bfloat16) + ((torch.randn(n, device=DEVICE) if with_ema else None),) for n in sizes]


def cloned(ts: list) -> list:
    return [tuple(None if t is None else t.clone() for t in group) for group in ts]


@pytest.mark.parametrize("with_ema", [True, False])
@pytest.mark.parametrize("sizes, parts", [(SIZES, [False]), (ALIGNED, [True]), (SIZES[:2] + ALIGNED, [True, False])])
def test_one_launch_over_many_tensors_is_each_tensors_update(with_ema, sizes, parts):
    ts = many(with_ema, sizes)
    alone = cloned(ts)
    launch = adamw.MultiTensorAdamW(sizes, torch.device(DEVICE))
    s = scalars(step=3, grad_scale=2.5)
    launch(ts, s, **HYPER, ema_weight=1e-2)
    for p, g, m, v, copy, ema in alone:
        adamw.adamw_master_(p, g, m, v, copy, s, **HYPER, ema=ema, ema_weight=1e-2)
    assert launch.table[:, 6].tolist() == sizes  # the one-launch kernel ran (its table holds the tensors)
    assert [aligned for _, aligned in launch.parts] == parts  # a second launch only for sizes not multiples of 16
    assert sorted(i for blocks, _ in launch.parts for i in blocks[:, 0].unique().tolist()) == list(range(len(sizes)))
    for got, want in zip(ts, alone):
        assert all(a is None or torch.equal(a, b) for a, b in zip(got, want))


def test_one_launch_skips_everything_on_found_inf():
    ts = many(True)
    before = cloned(ts)
    adamw.MultiTensorAdamW(SIZES, torch.device(DEVICE))(ts, scalars(step=1, found_inf=1.0), **HYPER, ema_weight=0.5)
    for got, want in zip(ts, before):
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_one_launch_takes_each_tensor_alone_when_one_is_misaligned():
    ts = many(False)
    p = ts[1][0]
    shifted = torch.empty(p.numel() + 1, device=DEVICE)[1:].copy_(p)  # contiguous, 4 bytes past an aligned address
    ts[1] = (shifted,) + ts[1][1:]
    alone = cloned(ts)
    launch = adamw.MultiTensorAdamW(SIZES, torch.device(DEVICE))
    launch(ts, scalars(2), **HYPER)
    for p, g, m, v, copy, ema in alone:
        adamw.adamw_master_(p, g, m, v, copy, scalars(2), **HYPER)
    assert not launch.table.any()
    for got, want in zip(ts, alone):
        assert all(a is None or torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.gpu
def test_one_launch_in_a_cuda_graph_reads_the_captured_tensors():
    """A launch captured in a CUDA graph updates the tensors it was captured with, once commit() has run, although
    eager calls with other tensors ran before the capture and between it and the replay."""
    launch = adamw.MultiTensorAdamW(SIZES, torch.device("cuda"))
    launch(many(True), scalars(1), **HYPER, ema_weight=0.1)  # eager: the table holds these addresses
    ts = many(True)
    alone = cloned(ts)
    s = scalars(2, grad_scale=1.5)
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        launch(ts, s, **HYPER, ema_weight=0.1)
    launch.commit()
    later = many(True)
    later_alone = cloned(later)
    launch(later, scalars(1), **HYPER, ema_weight=0.1)  # eager, after the capture: its own addresses, not the graph's
    graph.replay()
    torch.cuda.synchronize()
    for p, g, m, v, copy, ema in alone:
        adamw.adamw_master_(p, g, m, v, copy, s, **HYPER, ema=ema, ema_weight=0.1)
    for p, g, m, v, copy, ema in later_alone:
        adamw.adamw_master_(p, g, m, v, copy, scalars(1), **HYPER, ema=ema, ema_weight=0.1)
    for got, want in zip(ts + later, alone + later_alone):
        assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.gpu
def test_adamw_master_on_a_large_tensor():
    """A DiT-XL/2 fc1-sized weight: every program's block, the last one partial."""
    p, g, m, v, copy = tensors(1152 * 4608 + 5, torch.bfloat16)
    ref = [t.double() for t in (p, g, m, v)]
    adamw.adamw_master_(p, g, m, v, copy, scalars(10, grad_scale=1.5), **HYPER)
    adamw.adamw_master_ref(*ref, torch.empty_like(ref[0]), scalars(10, grad_scale=1.5).double(), **HYPER)
    assert_close_scaled(p, ref[0], 2e-6, "p")
    assert_rounded(copy, p)
