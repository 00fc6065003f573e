"""build_train_step: train.py's --compile also compiles the diffusion's loss terms; without it they stay eager."""
import pytest
import torch

from opendit.models import DiT
from opendit.parallel.mesh import ParallelMesh
from opendit.training.args import get_parser
from opendit.training.step import build_train_step


@pytest.mark.parametrize("compile_flag", [True, False])
def test_compile_flag_compiles_the_loss_terms(compile_flag):
    argv = ["--model", "DiT-S/2", "--vae", "none", "--image_size", "32", "--device", "cpu"] + (["--compile"] if compile_flag else [])
    args = get_parser().parse_args(argv)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    step = build_train_step(args, model, model, ParallelMesh(), max_steps=10)
    losses = step.diffusion._mse_losses
    assert hasattr(losses, "_torchdynamo_orig_callable") == compile_flag  # what torch.compile returns for a function
    assert (getattr(losses, "_torchdynamo_orig_callable", losses).__func__.__name__) == "_mse_losses"
