"""An fp32 EMA of the weights kept shard-for-shard like the parameters (FSDP2 DTensor shards, or full tensors)."""
from typing import Dict, Optional

import torch
import torch.nn as nn

from opendit.parallel.mesh import local_shard


class ShardedEMA:
    """ema = decay * ema + (1 - decay) * param on each rank's own shards, with no communication; frozen weights are kept, never updated."""

    def __init__(self, model: nn.Module, lerp: bool = True):
        # A DTensor clone keeps the parameter's mesh and placements: EMA shard i lines up with parameter shard i.
        params = dict(model.named_parameters())
        self.shadow: Dict[str, torch.Tensor] = {  # the state_dict's entries: parameters in fp32, persistent buffers as they are
            name: params[name].detach().to(torch.float32, copy=True) if name in params else t.detach().clone() for name, t in model.state_dict().items()
        }
        self._trainable = [(name, p) for name, p in params.items() if p.requires_grad]  # the sharded parameters themselves
        self.lerp = lerp  # one foreach lerp (3 passes over the weights); False: the former mul + add (5, or 7 with keep)
        self._weight: Optional[torch.Tensor] = None  # keep: the step's weight repeated, as long as the largest shard

    @torch.no_grad()
    def update(self, decay: float, keep: Optional[torch.Tensor] = None) -> None:
        """One EMA step from the current parameters (DiT's update, as foreach ops on the local shards); `keep`, a
        0-d bool device tensor, turns it into a no-op without a host sync (the divergence guard's skipped step)."""
        ema = [local_shard(self.shadow[name]) for name, _ in self._trainable]
        params = [local_shard(p).float() for _, p in self._trainable]
        if not ema:
            return
        if not self.lerp:
            self._mul_add(ema, params, decay, keep)
        elif keep is None:
            torch._foreach_lerp_(ema, params, 1 - decay)  # ema + (1 - decay) * (param - ema)
        else:
            # foreach lerp takes no device scalar: its per-element weights are views of one buffer holding the step's
            # weight (0 when keep: ema + 0 * (param - ema) is ema exactly), shaped like each shard.
            if self._weight is None:
                self._weight = torch.empty(max(e.numel() for e in ema), dtype=ema[0].dtype, device=ema[0].device)
            self._weight.copy_(torch.where(keep.to(ema[0].device), 0.0, 1 - decay))
            torch._foreach_lerp_(ema, params, [self._weight[: e.numel()].view(e.shape) for e in ema])

    @staticmethod
    def _mul_add(ema: list, params: list, decay: float, keep: Optional[torch.Tensor]) -> None:
        """decay * ema + (1 - decay) * param as a multiply then an add (ShardedEMA(lerp=False), for comparison)."""
        if keep is None:
            torch._foreach_mul_(ema, decay)
            torch._foreach_add_(ema, params, alpha=1 - decay)
            return
        keep = keep.to(ema[0].device)
        torch._foreach_mul_(ema, torch.where(keep, 1.0, decay))
        torch._foreach_add_(ema, torch._foreach_mul(params, torch.where(keep, 0.0, 1 - decay)))

    @torch.no_grad()
    def load_full(self, state_dict: Dict[str, torch.Tensor]) -> None:
        """Set the EMA from full (unsharded) weights under the model's names; all ranks call it (DTensor entries are scattered)."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        if set(state_dict) != set(self.shadow):
            raise ValueError(f"EMA weights' names differ from the model's: {sorted(set(state_dict) ^ set(self.shadow))[:3]}")
        for name, t in self.shadow.items():
            full = state_dict[name].to(dtype=t.dtype, device=t.device)
            t.copy_(distribute_tensor(full, t.device_mesh, t.placements) if isinstance(t, DTensor) else full)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The EMA weights under the model's names; sharded ones stay DTensors (what DCP saves and loads in place)."""
        return dict(self.shadow)
