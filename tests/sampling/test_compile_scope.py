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
