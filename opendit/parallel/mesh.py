"""The (dp, sp) device mesh: sequence-parallel ranks are contiguous, so an sp group stays inside a node."""
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from opendit.distributed.mesh import DP, SP


def build_mesh(world_size: int, sp_size: int, device_type: str) -> DeviceMesh:
    """A (world_size / sp_size, sp_size) mesh named ("dp", "sp"); rank = dp_index * sp_size + sp_index."""
    if sp_size < 1 or world_size % sp_size:
        raise ValueError(f"sequence-parallel size {sp_size} does not divide the world size {world_size}")
    return init_device_mesh(device_type, (world_size // sp_size, sp_size), mesh_dim_names=(DP, SP))
