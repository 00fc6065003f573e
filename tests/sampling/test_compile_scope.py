"""--compile_scope: the whole model on one process (auto), each block when asked (nothing is run: compile is lazy)."""
import argparse

import pytest

from opendit.models import DiT
from opendit.sampling.sample import speed_up


@pytest.mark.parametrize("scope,whole", [("auto", True), ("model", True), ("blocks", False)])
def test_compile_scope(scope, whole):
    model = DiT(depth=2, hidden_size=32, num_heads=2, in_channels=4, num_classes=10, input_size=8, patch_size=2)
    args = argparse.Namespace(enable_modulate_kernel=False, enable_flashattn=False, compile=True, compile_scope=scope)
    speed_up(args, model)
    assert (model._compiled_call_impl is not None) == whole
    assert all((b._compiled_call_impl is not None) != whole for b in model.blocks)
    assert list(model.state_dict()) == list(DiT(depth=2, hidden_size=32, num_heads=2, in_channels=4, num_classes=10, input_size=8, patch_size=2).state_dict())


def test_both_scripts_take_the_flag_with_auto_as_default():
    """sample.py and sample_ddp.py parse --compile_scope (default auto: the whole model on one process)."""
    from opendit.sampling import sample as sample_cli
    from opendit.sampling import sample_ddp as ddp_cli

    for parser in (sample_cli.get_parser(), ddp_cli.get_parser()):
        assert parser.parse_args(["--ckpt", "x"]).compile_scope == "auto"
        assert parser.parse_args(["--ckpt", "x", "--compile_scope", "blocks"]).compile_scope == "blocks"
