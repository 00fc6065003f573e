"""dp x sp = 2 x 2: DDP or FSDP2 plus sequence parallelism gives one process's gradient of the loss over the concatenated batch."""
import copy

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from opendit.diffusion import create_diffusion
from opendit.parallel import apply_sequence_parallel, build_mesh, sp_all_reduce_grads


def _losses(model, x, t, y, noise):
    return create_diffusion("").training_losses(model, x, t, dict(y=y), noise=noise)["loss"]  # (N,): DiT's hybrid loss


def _check_grads(model, grads_ref, what):
    for name, p in model.named_parameters():
        if p.requires_grad:
            atol = 1e-10 * float(grads_ref[name].abs().max()) + 1e-300
            torch.testing.assert_close(p.grad, grads_ref[name], rtol=1e-9, atol=atol, msg=lambda m: f"{what}: gradient of {name}: {m}")


def _check_dp_sp(rank, world_size, model, batch, grads_ref, kind):
    mesh = build_mesh(world_size, 2, "cpu")
    dm = mesh.device_mesh
    assert dm.mesh_dim_names == ("dp", "sp") and dm.mesh.tolist() == [[0, 1], [2, 3]], "sp ranks are contiguous"
    assert (mesh.dp_size, mesh.sp_size, mesh.dp_rank) == (2, 2, rank // 2)
    dp_rank, dp_group, sp_group = mesh.dp_rank, mesh.dp_group, mesh.sp_group
    x, t, y, noise = (v.chunk(2)[dp_rank].clone() for v in batch)  # dp peers get different data
    if dm.get_local_rank("sp") > 0:  # a follower's own draws are overwritten by its leader's
        x, noise = torch.zeros_like(x), torch.randn_like(noise)
    mesh.share_sample(x, t, y, noise)

    # Rule 1: average over dp only (DDP on the dp group), then sum over sp.
    ddp = DDP(apply_sequence_parallel(copy.deepcopy(model), sp_group, kind), process_group=dp_group)
    _losses(ddp, x, t, y, noise).mean().backward()
    sp_all_reduce_grads(ddp.module, sp_group)
    _check_grads(ddp.module, grads_ref, f"{kind}, DDP over dp + sp_all_reduce_grads")

    # Rule 2: average over every rank (DDP on the world) and back-propagate loss * sp.
    ddp = DDP(apply_sequence_parallel(copy.deepcopy(model), sp_group, kind))
    mesh.gradient_loss(_losses(ddp, x, t, y, noise).mean()).backward()
    _check_grads(ddp.module, grads_ref, f"{kind}, DDP over the world + loss * sp")

    # Rule 2 with FSDP2 (ZeRO) sharding every block and the root over all dp x sp ranks.
    sharded = apply_sequence_parallel(copy.deepcopy(model), sp_group, kind)
    flat = mesh.reduction
    for block in sharded.blocks:
        fully_shard(block, mesh=flat)
    fully_shard(sharded, mesh=flat)
    (_losses(sharded, x, t, y, noise).mean() * dist.get_world_size(sp_group)).backward()
    for p in sharded.parameters():
        if p.requires_grad:
            p.grad = p.grad.full_tensor()  # the gathered gradient, to compare
    _check_grads(sharded, grads_ref, f"{kind}, FSDP2 over the world + loss * sp")


@pytest.mark.parametrize("kind", ["fastseq", "ulysses"])
def test_dp2_sp2_matches_one_process(spawn, tiny_models, dp_sp_reference, kind):
    model, sample_shape = tiny_models["VDiT"]
    batch, grads_ref = dp_sp_reference(model, sample_shape)
    spawn(_check_dp_sp, 4, model, batch, grads_ref, kind)
