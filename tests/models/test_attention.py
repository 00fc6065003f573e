"""Attention backends: the fused GPU path agrees with the fp32-softmax reference."""
import pytest
import torch

from opendit.models.attention import fast_attention, math_attention, sdpa_attention


def test_sdpa_matches_math_reference_fp32():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(sdpa_attention(q, k, v), math_attention(q, k, v))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fast_attention_matches_reference_at_head_dim_72(dtype):
    torch.manual_seed(0)
    q, k, v = (torch.randn(4, 16, 256, 72, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    out = fast_attention(q, k, v)
    ref = math_attention(q.float(), k.float(), v.float())
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    out.float().square().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))
