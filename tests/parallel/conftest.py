"""Launch gloo process groups on the CPU (forked, so the parent's models and tensors reach every rank), and tiny models."""
import itertools
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from opendit.models import DiT, Latte, VDiT
from tiny import randomize  # tests/tiny.py

_launches = itertools.count()


def _run(rank, world_size, init_file, fn, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


@pytest.fixture
def spawn(tmp_path):
    """spawn(fn, world_size, *args) runs fn(rank, world_size, *args) on world_size gloo ranks; a failure on any fails the test."""

    def launch(fn, world_size, *args):
        init_file = tmp_path / f"pg-{next(_launches)}"
        mp.start_processes(_run, args=(world_size, str(init_file), fn, args), nprocs=world_size, join=True, start_method="fork")

    return launch


@pytest.fixture
def tiny_models():
    """name -> (randomized float64 model, input shape of one sample): depth 2, hidden 64, 4 heads, 16 tokens per frame."""
    config = dict(depth=2, hidden_size=64, num_heads=4, in_channels=4, num_classes=10, input_size=8)
    torch.manual_seed(0)
    return {
        "DiT": (randomize(DiT(patch_size=2, **config)), (4, 8, 8)),
        "VDiT": (randomize(VDiT(patch_size=(1, 2, 2), num_frames=2, **config)), (4, 2, 8, 8)),
    }


@pytest.fixture
def tiny_latte():
    """(randomized float64 Latte, input shape of one sample): 4 blocks (S T S T), hidden 32, 4 heads, 8 frames of 16 positions."""
    torch.manual_seed(0)
    model = Latte(patch_size=(1, 2, 2), num_frames=8, input_size=8, depth=4, hidden_size=32, num_heads=4, num_classes=10)
    return randomize(model), (4, 8, 8, 8)


@pytest.fixture
def dp_sp_reference():
    """make(model, sample_shape) -> (batch, grads): a fixed float64 batch of 4 (x, t, y, noise) for dp = 2 ranks, and one
    process's parameter gradients of DiT's mean hybrid loss over all of it (the model is left with no gradients)."""
    from opendit.diffusion import create_diffusion

    def make(model, sample_shape):
        model.eval()  # no label dropout: the reference draws one mask for the whole batch, the dp ranks one each
        gen = torch.Generator().manual_seed(2)
        batch = (
            torch.randn(4, *sample_shape, generator=gen, dtype=torch.float64),  # x: two samples per dp rank
            torch.randint(0, 1000, (4,), generator=gen),  # t
            torch.randint(0, 10, (4,), generator=gen),  # y
            torch.randn(4, *sample_shape, generator=gen, dtype=torch.float64),  # noise
        )
        x, t, y, noise = batch
        create_diffusion("").training_losses(model, x, t, dict(y=y), noise=noise)["loss"].mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        return batch, grads

    return make
