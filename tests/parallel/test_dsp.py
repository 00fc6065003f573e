"""Latte under DSP (and Ulysses / FastSeq on its spatial blocks) equals one process: outputs and every parameter
gradient summed over the sp ranks; DSP's communication is one all-to-all of the hidden state per block boundary."""
import copy
from collections import Counter

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from opendit.diffusion import create_diffusion
from opendit.errors import UsageError  # one line from train.py / sample.py, never a traceback
from opendit.models import DiT, Latte
from opendit.parallel import build_mesh, collectives, parallelize
from opendit.parallel.dsp import apply_dsp, apply_latte_sequence_parallel
from opendit.parallel.parallelize import enable_grad_checkpointing
from ranks import assert_equal64, assert_sp_matches  # tests/ranks.py

KINDS = ["dsp", "dsp+checkpoint", "ulysses", "fastseq"]


def _forward_backward(model, x, t, y, probe):
    torch.manual_seed(7)  # the label dropout draws the same mask on every rank and in the reference
    out = model(x, t, y)
    (out * probe).sum().backward()
    return out.detach()


def _check_kinds(rank, world_size, model, x, t, y, probe, out_ref, grads_ref):
    for kind in KINDS:
        what = f"{kind} on {world_size} ranks"
        sp_model = apply_latte_sequence_parallel(copy.deepcopy(model), dist.group.WORLD, kind.split("+")[0])
        if kind.endswith("+checkpoint"):  # hooks sit outside the recomputed forward: no collective runs twice
            enable_grad_checkpointing(sp_model)
        assert_sp_matches(sp_model, model, _forward_backward(sp_model, x, t, y, probe), out_ref, grads_ref, what)


@pytest.mark.parametrize("world_size", [2, 4])
def test_latte_matches_one_process(spawn, tiny_latte, world_size):
    model, sample_shape = tiny_latte
    model.train()  # label dropout on: the sp ranks must drop the same labels
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, *sample_shape, generator=gen, dtype=torch.float64)
    t, y = torch.randint(0, 1000, (2,), generator=gen), torch.randint(0, 10, (2,), generator=gen)
    probe = torch.randn(2, 8, *sample_shape[1:], generator=gen, dtype=torch.float64)
    out_ref = _forward_backward(model, x, t, y, probe)
    grads_ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(g.abs().sum() > 0 for g in grads_ref.values()), "every gradient should be non-zero to be a test"
    model.zero_grad(set_to_none=True)
    spawn(_check_kinds, world_size, model, x, t, y, probe, out_ref, grads_ref)


# --- communication ---------------------------------------------------------------------------------------------------
def _count_collectives(rank, world_size, model, x, t, y):
    """(name, numel) of every collective of one forward + backward, per mode, compared with the formulas."""
    N, (frames, positions), D, depth = x.shape[0], model.frames_positions, model.hidden_size, len(model.blocks)
    shard = N * frames * positions * D // world_size  # elements of one rank's hidden state
    seen = Counter()
    originals = {name: getattr(collectives, name) for name in ("all_to_all", "all_gather", "reduce_scatter")}

    def counting(name):
        def fn(tensor, group):
            seen[(name, tensor.numel())] += 1
            return originals[name](tensor, group)

        return fn

    for name in originals:
        setattr(collectives, name, counting(name))
    try:
        for kind in ("dsp", "ulysses"):
            seen.clear()
            model_kind = apply_latte_sequence_parallel(copy.deepcopy(model), dist.group.WORLD, kind)
            model_kind(x, t, y).sum().backward()
            gathered = N * frames * positions * model.final_layer.linear.out_features // world_size
            if kind == "dsp":  # one all-to-all per block boundary, forward and backward: 2 per block pair each way
                expected = {("all_to_all", shard): 2 * (depth - 1), ("all_gather", gathered): 1}
            else:  # per spatial block: q|k|v (3 shards) and the output (1 shard), forward and backward
                expected = {("all_to_all", 3 * shard): 2 * (depth // 2), ("all_to_all", shard): 2 * (depth // 2), ("all_gather", gathered): 1}
            assert dict(seen) == expected, f"{kind}: {dict(seen)} != {expected}"
    finally:
        for name, fn in originals.items():
            setattr(collectives, name, fn)


def test_dsp_moves_half_of_ulysses(spawn, tiny_latte):
    """Per block pair, forward: DSP 2 all-to-alls of one shard; Ulysses 3 + 1 shards in the spatial block's attention."""
    model, sample_shape = tiny_latte
    x = torch.randn(1, *sample_shape, dtype=torch.float64)
    spawn(_count_collectives, 2, model, x, torch.tensor([5]), torch.tensor([3]))


# --- errors -------------------------------------------------------------------------------------------------------
def _check_errors(rank, world_size, model):
    group = dist.group.WORLD
    with pytest.raises(ValueError, match="applies to Latte models"):
        apply_dsp(DiT(input_size=8, depth=1, hidden_size=32, num_heads=4, num_classes=10), group)
    with pytest.raises(UsageError, match="3 token frames do not divide by the sequence-parallel size 2"):
        apply_dsp(Latte(num_frames=3, input_size=8, depth=2, hidden_size=32, num_heads=4), group)
    with pytest.raises(UsageError, match="9 positions per frame do not divide"):
        apply_dsp(Latte(num_frames=2, input_size=6, depth=2, hidden_size=32, num_heads=4), group)
    with pytest.raises(ValueError, match="sequence-parallel type 'ring' for Latte"):
        apply_latte_sequence_parallel(copy.deepcopy(model), group, "ring")
    with pytest.raises(ValueError, match=r"already applied"):
        apply_dsp(apply_dsp(copy.deepcopy(model), group), group)
    three_heads = Latte(num_frames=2, input_size=8, depth=2, hidden_size=48, num_heads=3)
    apply_dsp(copy.deepcopy(three_heads), group)  # DSP never splits heads
    with pytest.raises(UsageError, match="3 attention heads do not divide"):
        apply_latte_sequence_parallel(three_heads, group, "ulysses")


def test_clear_errors(spawn, tiny_latte):
    spawn(_check_errors, 2, tiny_latte[0])


# --- dp x sp ------------------------------------------------------------------------------------------------------
def _losses(model, x, t, y, noise):
    return create_diffusion("").training_losses(model, x, t, dict(y=y), noise=noise)["loss"]  # (N,): DiT's hybrid loss


def _check_dp_sp(rank, world_size, model, batch, grads_ref):
    mesh = build_mesh(world_size, 2, "cpu")
    dp_rank, sp_group = mesh.dp_rank, mesh.sp_group
    x, t, y, noise = (v.chunk(2)[dp_rank].clone() for v in batch)  # dp peers get different data
    mesh.share_sample(x, t, y, noise)
    # Average over every rank (DDP on the world) and back-propagate loss * sp, as train.py does.
    ddp = DDP(apply_dsp(copy.deepcopy(model), sp_group))
    (_losses(ddp, x, t, y, noise).mean() * dist.get_world_size(sp_group)).backward()
    for name, p in ddp.module.named_parameters():
        if p.requires_grad:
            assert_equal64(p.grad, grads_ref[name], f"DSP, DDP over the world + loss * sp: gradient of {name}")

    # The same under FSDP2 (ZeRO, what zero2 / zero3 use), applied by parallelize() over all dp x sp ranks.
    sharded = parallelize(copy.deepcopy(model), mesh, plugin="zero2", blocks_per_unit=2)  # float64 weights, reduced in float64
    mesh.gradient_loss(_losses(sharded, x, t, y, noise).mean()).backward()
    for name, p in sharded.named_parameters():
        if p.requires_grad:
            assert_equal64(p.grad.full_tensor(), grads_ref[name], f"DSP, FSDP2 over the world + loss * sp: gradient of {name}")


def test_dp2_sp2_matches_one_process(spawn, tiny_latte, dp_sp_reference):
    model, sample_shape = tiny_latte
    batch, grads_ref = dp_sp_reference(model, sample_shape)
    spawn(_check_dp_sp, 4, model, batch, grads_ref)
