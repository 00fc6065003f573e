"""--bf16_residual in sample.py and sample_ddp.py: train.py's flag (the DiT residual stream in the autocast dtype),
off by default, refused in one line where it would do nothing, and applied by speed_up."""
import argparse

import pytest
import torch

from opendit.errors import UsageError
from opendit.models import DiT
from opendit.sampling import sample as sample_cli
from opendit.sampling import sample_ddp as ddp_cli


def _speed_args(**kw):
    base = dict(mixed_precision="bf16", enable_flashattn=False, enable_modulate_kernel=False, compile=False, cuda_graph="off", float8=False,
                sequence_parallel_size=1, bf16_residual=True, model="DiT-S/2")
    return argparse.Namespace(**{**base, **kw})


def test_both_scripts_take_the_flag_off_by_default():
    for parser in (sample_cli.get_parser(), ddp_cli.get_parser()):
        assert parser.parse_args(["--ckpt", "x"]).bf16_residual is False
        assert parser.parse_args(["--ckpt", "x", "--bf16_residual"]).bf16_residual is True


@pytest.mark.parametrize("kw,words", [({"mixed_precision": "fp32"}, "--bf16_residual needs --mixed_precision bf16 or fp16"),
                                      ({"model": "Latte-XL/1x2x2"}, "--bf16_residual: Latte-XL/1x2x2 keeps its residual stream in fp32")])
def test_refused_in_one_line_where_it_would_do_nothing(kw, words):
    with pytest.raises(UsageError, match=words) as e:
        sample_cli.resolve_speed_flags(_speed_args(**kw), torch.device("cpu"))
    assert "\n" not in str(e.value)


def test_applied_by_speed_up_and_only_changes_rounding():
    sample_cli.resolve_speed_flags(_speed_args(), torch.device("cpu"))  # accepted in bf16 on the CPU too
    torch.manual_seed(0)
    model = DiT(depth=2, hidden_size=64, num_heads=4, in_channels=4, num_classes=10, input_size=8, patch_size=2).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.05 * torch.randn_like(p))
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.tensor([1, 2])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(x, t, y)
        sample_cli.speed_up(argparse.Namespace(enable_modulate_kernel=False, enable_flashattn=False, compile=False, bf16_residual=True), model)
        out = model(x, t, y)
    assert model.kernels.low_precision_residual and not torch.equal(out, ref)
    assert (out - ref).norm() / ref.norm() < 3e-2
