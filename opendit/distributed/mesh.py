"""Data-parallel views of the (dp, sp) device mesh that opendit.parallel.mesh.build_mesh makes."""
from typing import Optional, Tuple

from torch.distributed.device_mesh import DeviceMesh

DP, SP, DP_SP = "dp", "sp", "dp_sp"


def reduction_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """Every rank of the mesh as one 1-D dim, "dp_sp": FSDP shards and DDP averages over it (ZeRO over the world)."""
    return mesh[DP, SP]._flatten(DP_SP)


def dp_coordinate(mesh: Optional[DeviceMesh]) -> Tuple[int, int]:
    """(data-parallel rank, data-parallel size): what seeds and shards the data; sequence-parallel peers share it."""
    if mesh is None:
        return 0, 1
    return mesh.get_local_rank(DP), mesh.size(mesh.mesh_dim_names.index(DP))


def sp_size(mesh: Optional[DeviceMesh]) -> int:
    """Ranks that share one sample (sequence parallelism); 1 without a mesh."""
    return 1 if mesh is None else mesh.size(mesh.mesh_dim_names.index(SP))
