"""Where a sampling process sits: world = dp x cfg x sp, rank = (dp_index * cfg + cfg_index) * sp + sp_index.

sp ranks split each step's tokens (as in train.py), the two cfg ranks run the conditional and the unconditional half
of each step (--cfg_parallel), and each dp group samples its contiguous share of the conditions.
"""
from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

from opendit.errors import UsageError


@dataclass
class SamplingLayout:
    """This rank's dp share and its sp mesh / cfg pair; one process: everything trivial."""

    rank: int = 0
    world: int = 1
    sp: int = 1
    cfg: int = 1
    mesh: Optional["ParallelMesh"] = None  # noqa: F821 (opendit.parallel is imported when a mesh is built)
    cfg_group: Optional[dist.ProcessGroup] = None

    @property
    def dp_size(self) -> int:
        return self.world // (self.sp * self.cfg)

    @property
    def dp_rank(self) -> int:
        return self.rank // (self.sp * self.cfg)

    @property
    def is_leader(self) -> bool:
        """The first rank of its dp group: it decodes and hands back the group's samples."""
        return self.rank % (self.sp * self.cfg) == 0

    def share(self, n: int) -> range:
        """This dp group's contiguous share of n conditions (the first groups get one more when n % dp != 0)."""
        base, extra = divmod(n, self.dp_size)
        start = self.dp_rank * base + min(self.dp_rank, extra)
        return range(start, start + base + (self.dp_rank < extra))


def build_layout(rank: int, world: int, sp: int, cfg_parallel: bool, device_type: str) -> SamplingLayout:
    """Check that cfg x sp divides the world and build the sp mesh and the cfg pairs (every rank creates every group)."""
    cfg = 2 if cfg_parallel else 1
    if sp < 1 or world % (sp * cfg):
        raise UsageError(f"--sequence_parallel_size {sp}{' x 2 (--cfg_parallel)' if cfg_parallel else ''} must divide the number of processes ({world})")
    if world == 1:
        return SamplingLayout()
    from opendit.parallel import build_mesh
    from opendit.parallel.mesh import cfg_pair_group

    mesh = build_mesh(world, sp, device_type) if sp > 1 else None
    return SamplingLayout(rank, world, sp, cfg, mesh, cfg_pair_group(rank, world, sp) if cfg_parallel else None)
