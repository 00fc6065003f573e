"""FastSeq (ring overlap on and off) and Ulysses attention equal one process's Attention: outputs and every gradient."""
import copy

import pytest
import torch
import torch.distributed as dist

from opendit.models.attention import Attention
from opendit.parallel.attention import FastSeqAttention, UlyssesAttention
from opendit.parallel.gather_linear import gather_linear

CASES = [(FastSeqAttention, {"overlap": True}), (FastSeqAttention, {"overlap": False}), (UlyssesAttention, {})]


def _close(actual, expected, what):
    """Equal up to float64 round-off of a different summation order (relative to the tensor's largest entry)."""
    atol = 1e-10 * float(expected.abs().max()) + 1e-300
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=atol, msg=lambda m: f"{what}: {m}")


def _check_attention(rank, world_size, attn, x, grad_out, out_ref, grads_ref, bf16_ref):
    group = dist.group.WORLD
    n = x.shape[1] // world_size
    mine = slice(rank * n, (rank + 1) * n)
    _check_autocast(attn, x[:, mine], bf16_ref[:, mine], group)
    for cls, options in CASES:
        sp_attn = cls.convert(copy.deepcopy(attn), group, **options)
        x_local = x[:, mine].clone().requires_grad_(True)
        out = sp_attn(x_local)
        out.backward(grad_out[:, mine])
        what = f"{cls.__name__}{options} on {world_size} ranks"
        _close(out, out_ref[:, mine], f"{what}: output")
        _close(x_local.grad, grads_ref["x"][:, mine], f"{what}: input gradient")
        for name, p in sp_attn.named_parameters():
            dist.all_reduce(p.grad)  # each rank holds the part from its own tokens
            _close(p.grad, grads_ref[name], f"{what}: gradient of {name}")


def _autocast_output(attn, x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return attn(x)


def _check_autocast(attn, x_local, ref, group):
    """Under autocast the qkv GEMMs and the gather run in bf16, and the fp32 weights get fp32 gradients, as with F.linear."""
    for cls, options in CASES:
        sp_attn = cls.convert(copy.deepcopy(attn).float(), group, **options)
        out = _autocast_output(sp_attn, x_local.float())
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), ref, rtol=0, atol=0.02 * float(ref.abs().max()))
        out.float().square().sum().backward()
        assert sp_attn.qkv.weight.grad.dtype == torch.float32 and sp_attn.qkv.weight.grad.isfinite().all()


@pytest.mark.parametrize("world_size", [2, 4])
def test_attention_matches_one_process(spawn, world_size):
    torch.manual_seed(0)
    attn = Attention(64, num_heads=4).double()
    x = torch.randn(2, 16, 64, dtype=torch.float64, requires_grad=True)  # (B, N, C)
    grad_out = torch.randn(2, 16, 64, dtype=torch.float64)
    out_ref = attn(x)
    out_ref.backward(grad_out)
    grads_ref = {"x": x.grad, **{name: p.grad.clone() for name, p in attn.named_parameters()}}
    attn.zero_grad(set_to_none=True)
    bf16_ref = _autocast_output(copy.deepcopy(attn).float(), x.detach().float()).float()
    spawn(_check_attention, world_size, attn, x.detach(), grad_out, out_ref.detach(), grads_ref, bf16_ref)


def _check_gather_linear(rank, world_size, x, weight, grad_out, out_ref, grads_ref):
    n, f = x.shape[1] // world_size, weight.shape[0] // world_size
    mine, rows = slice(rank * n, (rank + 1) * n), slice(rank * f, (rank + 1) * f)  # this rank's tokens and output rows
    for overlap in (True, False):
        x_local, w = x[:, mine].clone().requires_grad_(True), weight[rows].clone().requires_grad_(True)
        out = gather_linear(x_local, w, None, dist.group.WORLD, overlap=overlap)
        out.backward(grad_out[..., rows])
        _close(out, out_ref[..., rows], f"overlap={overlap}: output")
        _close(x_local.grad, grads_ref[0][:, mine], f"overlap={overlap}: input gradient (summed over the ranks' rows)")
        _close(w.grad, grads_ref[1][rows], f"overlap={overlap}: weight gradient (all tokens, so complete)")


@pytest.mark.parametrize("world_size", [2, 4])
def test_gather_linear_without_bias(spawn, world_size):
    torch.manual_seed(1)
    x = torch.randn(3, 8, 16, dtype=torch.float64, requires_grad=True)  # (B, N, C)
    weight = torch.randn(12, 16, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(3, 8, 12, dtype=torch.float64)
    out_ref = torch.nn.functional.linear(x, weight)
    out_ref.backward(grad_out)
    spawn(_check_gather_linear, world_size, x.detach(), weight.detach(), grad_out, out_ref.detach(), (x.grad, weight.grad))
