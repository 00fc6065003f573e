"""The MLP's GELU-epilogue switch: only on CUDA without autograd, and then as close to float64 as the plain path."""
import argparse

import pytest
import torch

from opendit.models.blocks import KernelChoice, Mlp


def _mlp(device="cpu"):
    torch.manual_seed(0)
    return Mlp(64, 256, KernelChoice(gelu_epilogue=True)).to(device)


def test_switch_ignored_on_cpu_and_under_autograd():
    mlp, x = _mlp(), torch.randn(2, 8, 64)
    ref = mlp.fc2(mlp.act(mlp.fc1(x)))
    with torch.no_grad():
        assert torch.equal(mlp(x), ref)  # CPU: the reference path
    assert torch.equal(mlp(x), ref)


def test_sampling_turns_it_on_for_bf16_only():
    from opendit.models import DiT
    from opendit.sampling.sample import speed_up

    for precision, on in (("bf16", True), ("fp16", True), ("fp32", False)):
        model = DiT(depth=1, hidden_size=32, num_heads=2, input_size=8, num_classes=10)
        args = argparse.Namespace(mixed_precision=precision, enable_modulate_kernel=False, enable_flashattn=False, compile=False)
        speed_up(args, model)
        assert model.kernels.gelu_epilogue is on and model.blocks[0].mlp.kernels is model.kernels


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cast", [False, True])
def test_epilogue_matches_float64_like_the_plain_path(cast):
    mlp, x = _mlp("cuda"), torch.randn(4, 256, 64, device="cuda")
    with torch.no_grad():
        exact = mlp.double()(x.double()).float()
        mlp.float()
        if cast:  # sample.py stores Linear weights in bf16
            mlp.to(torch.bfloat16)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            fused = mlp(x)
            mlp.kernels.gelu_epilogue = False
            plain = mlp(x)
    assert fused.dtype == plain.dtype == torch.bfloat16 and not torch.equal(fused, plain)  # the epilogue ran
    err_fused, err_plain = ((y.float() - exact).norm() / exact.norm() for y in (fused, plain))
    assert err_fused < 1.2 * err_plain + 1e-4, (err_fused, err_plain)
