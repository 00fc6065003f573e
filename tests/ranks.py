"""Multi-process CPU tests: ranks are forked (no re-import of torch) and joined on gloo; tests/conftest.py hands these
helpers out as the `dt` fixture, and tests/parallel/nccl_equivalence.py reuses them on GPUs."""
import os
import socket
import time
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from opendit.builders import build_model

TINY_CONFIG = dict(model="DiT-S/2", input_size=8, in_channels=4, num_classes=8, depth=2, hidden_size=64, num_heads=2)
# train.py flags of a tiny pixel-space run on the shapes data (fp32, CPU).
TRAIN_FLAGS = ["--model", "DiT-S/2", "--depth", "2", "--hidden_size", "32", "--num_heads", "2", "--image_size", "16", "--vae", "none",
               "--num_classes", "8", "--dataset", "shapes", "--dataset_size", "64", "--batch_size", "4", "--mixed_precision", "fp32",
               "--num_workers", "0", "--log_every", "1", "--device", "cpu"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world_size: int, port: int, args: tuple, env: dict) -> None:
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), **env)
    try:
        fn(rank, world_size, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, env: dict = None, timeout: float = 240) -> None:
    """Run fn(rank, world_size, *args) in world_size forked processes with torchrun's environment variables set;
    an exception in any rank fails the test with that rank's traceback."""
    context = mp.start_processes(_entry, args=(fn, world_size, free_port(), args, env or {}), nprocs=world_size, join=False, start_method="fork")
    deadline = time.time() + timeout
    while not context.join(timeout=1):
        if time.time() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{fn.__name__} on {world_size} ranks did not finish in {timeout} s")


def init_gloo() -> None:
    dist.init_process_group("gloo")


def tiny_model() -> torch.nn.Module:
    """A 2-block DiT whose weights are all non-zero (adaLN-Zero would leave most gradients zero)."""
    torch.manual_seed(0)
    model = build_model(TINY_CONFIG)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    return model.eval()  # no label dropout: every rank's batch is fixed


def batch(step: int, n: int = 8) -> tuple:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 4, 8, 8, generator=g), torch.randint(0, 1000, (n,), generator=g), torch.randint(0, 8, (n,), generator=g), torch.randn(n, 8, 8, 8, generator=g)


def loss_on(model, step: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """MSE of the model on this rank's slice of the step's fixed batch (the slices' mean is the full batch's loss)."""
    device = next(model.parameters()).device  # CPU here; a GPU in nccl_equivalence.py
    x, t, y, target = (v.to(device) for v in batch(step))
    part = slice(rank * len(x) // world_size, (rank + 1) * len(x) // world_size)
    return ((model(x[part], t[part], y[part]) - target[part]) ** 2).mean()


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor, gathered when it is a DTensor shard."""
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def assert_equal64(actual, expected, what):
    """Equal up to float64 round-off of a different summation order (relative to the tensor's largest entry)."""
    atol = 1e-10 * float(expected.abs().max()) + 1e-300
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=atol, msg=lambda m: f"{what}: {m}")


def assert_sp_matches(sp_model, model, out, out_ref, grads_ref, what):
    """A sequence-parallel copy of model after its forward + backward: the same parameter names, the reference's output
    and, once the ranks' gradients are summed, every gradient of the one-process run."""
    from opendit.parallel import sp_all_reduce_grads

    assert list(sp_model.state_dict()) == list(model.state_dict()), what
    assert_equal64(out, out_ref, f"{what}: output")
    sp_all_reduce_grads(sp_model, dist.group.WORLD)
    for name, p in sp_model.named_parameters():
        if p.requires_grad:
            assert_equal64(p.grad, grads_ref[name], f"{what}: gradient of {name}")


def helpers() -> SimpleNamespace:
    return SimpleNamespace(run=run_ranks, init=init_gloo, tiny_model=tiny_model, batch=batch, loss_on=loss_on, full=full, config=TINY_CONFIG, flags=TRAIN_FLAGS, device_type="cpu")
