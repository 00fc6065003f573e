"""Sequence-parallel DiT and VDiT equal one process: outputs, and every parameter gradient summed over the sp ranks."""
import copy

import pytest
import torch
import torch.distributed as dist
from ranks import assert_sp_matches  # tests/ranks.py

from opendit.errors import UsageError  # one line from train.py / sample.py, never a traceback
from opendit.models import DiT
from opendit.parallel import apply_sequence_parallel
from opendit.parallel.parallelize import enable_grad_checkpointing

KINDS = [("fastseq", True), ("fastseq", False), ("ulysses", True), ("fastseq+checkpoint", True)]


def _forward_backward(model, x, t, y, probe, seed):
    torch.manual_seed(seed)  # the label dropout draws the same mask on every rank and in the reference
    out = model(x, t, y)
    (out * probe).sum().backward()
    return out.detach()


def _check_models(rank, world_size, cases):
    for name, (model, x, t, y, probe, out_ref, grads_ref) in cases.items():
        for kind, overlap in KINDS:
            what = f"{name} {kind} overlap={overlap} on {world_size} ranks"
            sp_model = apply_sequence_parallel(copy.deepcopy(model), dist.group.WORLD, kind.split("+")[0], overlap)
            if kind.endswith("+checkpoint"):  # the collectives run again in the recomputation, in the same order everywhere
                enable_grad_checkpointing(sp_model)
            assert_sp_matches(sp_model, model, _forward_backward(sp_model, x, t, y, probe, seed=7), out_ref, grads_ref, what)


@pytest.mark.parametrize("world_size", [2, 4])
def test_models_match_one_process(spawn, tiny_models, world_size):
    cases = {}
    for name, (model, sample_shape) in tiny_models.items():
        model.train()  # label dropout on: the sp ranks must drop the same labels
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(3, *sample_shape, generator=gen, dtype=torch.float64)
        t = torch.randint(0, 1000, (3,), generator=gen)
        y = torch.randint(0, 10, (3,), generator=gen)
        probe = torch.randn(3, 8, *sample_shape[1:], generator=gen, dtype=torch.float64)
        out_ref = _forward_backward(model, x, t, y, probe, seed=7)
        grads_ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        assert all(g.abs().sum() > 0 for g in grads_ref.values()), "every gradient should be non-zero to be a test"
        model.zero_grad(set_to_none=True)
        cases[name] = (model, x, t, y, probe, out_ref, grads_ref)
    spawn(_check_models, world_size, cases)


def _check_errors(rank, world_size, model):
    group = dist.group.WORLD
    with pytest.raises(ValueError, match="sequence-parallel type"):
        apply_sequence_parallel(copy.deepcopy(model), group, kind="ring")
    with pytest.raises(UsageError, match="3 attention heads do not divide by the sequence-parallel size 2"):
        apply_sequence_parallel(DiT(input_size=8, depth=1, hidden_size=48, num_heads=3, num_classes=10), group)
    odd = apply_sequence_parallel(DiT(input_size=6, depth=1, hidden_size=64, num_heads=4, num_classes=10), group)
    with pytest.raises(UsageError, match="9 tokens do not divide by the sequence-parallel size 2"):
        odd(torch.randn(1, 4, 6, 6), torch.zeros(1), torch.zeros(1, dtype=torch.long))
    sp_model = apply_sequence_parallel(copy.deepcopy(model), group)
    with pytest.raises(ValueError, match="already applied"):
        apply_sequence_parallel(sp_model, group)
    single = [dist.new_group([0]), dist.new_group([1])][rank]  # every rank takes part in creating both groups
    unchanged = apply_sequence_parallel(copy.deepcopy(model), single)
    assert not unchanged.blocks[0]._forward_pre_hooks and type(unchanged.blocks[0].attn).__name__ == "Attention"


def test_clear_errors(spawn, tiny_models):
    spawn(_check_errors, 2, tiny_models["DiT"][0])
