"""The (dp, sp) device mesh and the views of it that training and sampling need, in one object."""
import sys
from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from opendit.errors import UsageError

DP, SP, DP_SP = "dp", "sp", "dp_sp"


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a tensor: the local shard of a DTensor, the tensor itself otherwise."""
    dtensor = sys.modules.get("torch.distributed.tensor")  # not imported: no DTensor exists (the import costs ~0.5 s)
    return t._local_tensor if dtensor is not None and isinstance(t, dtensor.DTensor) else t


@dataclass
class ParallelMesh:
    """Where this process sits in data parallelism (dp) x sequence parallelism (sp); one process: no device mesh.

    Sequence-parallel ranks are contiguous (rank = dp_index * sp_size + sp_index), so an sp group stays inside a node.
    """

    device_mesh: Optional[DeviceMesh] = None

    @property
    def dp_rank(self) -> int:
        """What seeds and shards the data; sequence-parallel peers share it."""
        return 0 if self.device_mesh is None else self.device_mesh.get_local_rank(DP)

    @property
    def dp_size(self) -> int:
        return 1 if self.device_mesh is None else self.device_mesh.size(0)

    @property
    def sp_size(self) -> int:
        """Ranks that share one sample; 1 without a mesh."""
        return 1 if self.device_mesh is None else self.device_mesh.size(1)

    @property
    def sp_group(self) -> Optional[dist.ProcessGroup]:
        return None if self.device_mesh is None else self.device_mesh.get_group(SP)

    @property
    def dp_group(self) -> Optional[dist.ProcessGroup]:
        return None if self.device_mesh is None else self.device_mesh.get_group(DP)

    @cached_property
    def reduction(self) -> DeviceMesh:
        """Every rank as one 1-D dim, "dp_sp": FSDP shards and DDP averages over it (ZeRO over the world)."""
        return self.device_mesh[DP, SP]._flatten(DP_SP)

    def describe(self, plugin: str) -> str:
        """'one process' or 'zero2 over 4 processes (dp 2 x sp 2)'."""
        if self.device_mesh is None:
            return "one process"
        return f"{plugin} over {self.dp_size * self.sp_size} processes (dp {self.dp_size} x sp {self.sp_size})"

    def gradient_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to back-propagate. sp peers hold partial gradients of one sample; DDP/FSDP average over all
        dp x sp ranks, so loss * sp_size makes that average the sum over sp of the dp replicas' mean."""
        return loss * self.sp_size if self.sp_size > 1 else loss

    @torch.no_grad()
    def share_sample(self, *tensors: torch.Tensor) -> None:
        """Overwrite each tensor (in place) with the sp group's first rank's copy, so all sp ranks see one sample
        (same latents, t and noise even where the VAE is not bit-reproducible). A no-op without sp."""
        if self.sp_size > 1:
            src = dist.get_global_rank(self.sp_group, 0)
            for t in tensors:
                dist.broadcast(t, src=src, group=self.sp_group)


def build_mesh(world_size: int, sp_size: int, device_type: str) -> ParallelMesh:
    """A (world_size / sp_size, sp_size) mesh named ("dp", "sp"); one process gets the empty ParallelMesh."""
    if sp_size < 1 or world_size % sp_size:
        raise UsageError(f"--sequence_parallel_size {sp_size}: it does not divide the number of processes, {world_size}")
    if world_size == 1:
        return ParallelMesh()
    return ParallelMesh(init_device_mesh(device_type, (world_size // sp_size, sp_size), mesh_dim_names=(DP, SP)))


def cfg_pair_group(rank: int, world: int, sp_size: int) -> dist.ProcessGroup:
    """Classifier-free-guidance parallelism: the group of the two ranks (conditional, unconditional half) that share
    this rank's dp group and sp index, with rank = (dp_index * 2 + cfg_index) * sp_size + sp_index. Every rank takes
    part in creating every pair, as new_group requires."""
    mine = None
    for d in range(world // (2 * sp_size)):
        for s in range(sp_size):
            ranks = [(d * 2 + c) * sp_size + s for c in range(2)]
            group = dist.new_group(ranks)
            if rank in ranks:
                mine = group
    return mine
