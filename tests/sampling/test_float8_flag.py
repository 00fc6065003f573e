"""--float8: parsed by both scripts, refused in one line where it cannot run, and applied by build_sampling_model to
the fp32 weights (then the rest cast to bf16) so that sampling stays close to bf16."""
import argparse

import pytest
import torch

from opendit.errors import UsageError
from opendit.kernels import float8
from opendit.kernels.float8 import Float8Linear, Float8Mlp, quantize_rows
from opendit.sampling import sample as sample_cli
from opendit.sampling import sample_ddp as ddp_cli
from opendit.sampling.denoise import denoise


def _speed_args(**kw):
    base = dict(mixed_precision=None, enable_flashattn=False, enable_modulate_kernel=False, compile=False, cuda_graph="off", float8=True, sequence_parallel_size=1)
    return argparse.Namespace(**{**base, **kw})


def test_both_scripts_take_the_flag_off_by_default():
    for parser in (sample_cli.get_parser(), ddp_cli.get_parser()):
        assert parser.parse_args(["--ckpt", "x"]).float8 is False
        assert parser.parse_args(["--ckpt", "x", "--float8"]).float8 is True


@pytest.mark.parametrize("kw,supported,words", [
    ({}, False, "--float8 needs a CUDA GPU of compute capability 8.9"),
    ({"mixed_precision": "fp16"}, True, "--float8 needs --mixed_precision bf16"),
    ({"sequence_parallel_size": 2}, True, "--float8 does not run with --sequence_parallel_size > 1"),
])
def test_refused_in_one_line(monkeypatch, kw, supported, words):
    monkeypatch.setattr(float8, "float8_supported", lambda device: supported)
    with pytest.raises(UsageError, match=words) as e:
        sample_cli.resolve_speed_flags(_speed_args(**kw), torch.device("cuda" if supported else "cpu"))
    assert "\n" not in str(e.value)


def test_accepted_on_a_float8_gpu_in_bf16(monkeypatch):
    monkeypatch.setattr(float8, "float8_supported", lambda device: True)
    args = _speed_args()
    sample_cli.resolve_speed_flags(args, torch.device("cuda"))
    assert args.mixed_precision == "bf16"


def test_build_quantizes_the_fp32_weights_and_samples_close_to_bf16():
    torch.manual_seed(0)
    config = dict(model="DiT-S/2", input_size=8, in_channels=4, num_classes=10, depth=2, hidden_size=64, num_heads=2)
    from opendit.builders import build_model

    state_dict = {k: 0.05 * torch.randn_like(v) for k, v in build_model(config).state_dict().items()}
    args = argparse.Namespace(ckpt="x", model="DiT-S/2", image_size=64, mixed_precision="bf16", float8=True)
    model = sample_cli.build_sampling_model(args, config, state_dict, torch.device("cpu"))
    block = model.blocks[0]
    assert isinstance(block.attn.qkv, Float8Linear) and isinstance(block.mlp, Float8Mlp)
    assert torch.equal(block.mlp.fc1.weight_q.float(), quantize_rows(state_dict["blocks.0.mlp.fc1.weight"])[0].float())  # from fp32, not bf16
    assert block.attn.proj.weight.dtype == torch.bfloat16 and block.adaLN_modulation[1].weight.dtype == torch.bfloat16

    args.float8 = False
    ref_model = sample_cli.build_sampling_model(args, config, state_dict, torch.device("cpu"))
    run = argparse.Namespace(sampler="ddim", num_sampling_steps=5, noise_schedule="linear", cfg_scale=4.0, cfg_channels="3", num_classes=10, vae="ema",
                             mixed_precision="bf16", compile=False)
    z, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 7])
    with torch.no_grad():
        out, ref = denoise(run, model, z, y), denoise(run, ref_model, z, y)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert out.isfinite().all() and 0 < rel < 0.05, rel
