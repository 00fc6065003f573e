"""An fp32 EMA of the weights kept shard-for-shard like the parameters (FSDP2 DTensor shards, or full tensors).

Deferred (`defer()`, the CUDA-graph step): update() only records its `keep` flag and the update itself runs at the
start of the next step, on a side stream beside that step's forward and backward (which read the parameters, never
write them); join() waits for it before AdamW writes them. state_dict() applies a pending update first, so every
reader (checkpoints, previews, the finiteness check) sees the EMA of the last finished step, as without deferring."""
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
        self._pending: Optional[torch.Tensor] = None  # deferred: the last step's keep flag (True: nothing pending)
        self._decay = 0.0  # deferred: the last step's decay
        self._stream: Optional[torch.cuda.Stream] = None  # deferred, CUDA: where the pending update runs

    def defer(self) -> None:
        """Leave each update to the next step's begin() (see the module docstring)."""
        device = self.shadow[self._trainable[0][0]].device if self._trainable else torch.device("cpu")
        self._pending = torch.ones((), dtype=torch.bool, device=device)
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def take(self, params: list) -> list:
        """Leave the EMA of these parameters to the caller (AdamW updates it in its pass, bf16_weights.py): returns their
        fp32 EMA tensors (local shards, what state_dict() holds) and drops them from this object's own updates."""
        ids = {id(p) for p in params}
        names = {id(p): name for name, p in self._trainable}
        self._trainable = [(name, p) for name, p in self._trainable if id(p) not in ids]
        return [local_shard(self.shadow[names[id(p)]]) for p in params]

    @torch.no_grad()
    def begin(self) -> None:
        """Deferred: start the pending update (on the side stream where CUDA); nothing otherwise."""
        if self._pending is None:
            return
        if self._stream is None:
            return self._apply_pending()
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            self._apply_pending()

    def join(self) -> None:
        """Deferred: the current stream waits for begin()'s update (call it before the parameters change)."""
        if self._stream is not None:
            torch.cuda.current_stream().wait_stream(self._stream)

    def _apply_pending(self) -> None:
        self._update(self._decay, self._pending)
        self._pending.fill_(True)  # applied: a step that skips update() (CPU, bad step) leaves nothing pending

    @torch.no_grad()
    def update(self, decay: float, keep: Optional[torch.Tensor] = None) -> None:
        """One EMA step from the current parameters (DiT's update, as foreach ops on the local shards); `keep`, a
        0-d bool device tensor, turns it into a no-op without a host sync (the divergence guard's skipped step).
        Deferred: records the step, for the next begin()."""
        if self._pending is None:
            return self._update(decay, keep)
        if keep is None:
            self._pending.fill_(False)
        else:
            self._pending.copy_(keep)
        self._decay = decay

    @torch.no_grad()
    def _update(self, decay: float, keep: Optional[torch.Tensor]) -> None:
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

        self.flush()  # then overwritten: nothing stays pending
        if set(state_dict) != set(self.shadow):
            raise ValueError(f"EMA weights' names differ from the model's: {sorted(set(state_dict) ^ set(self.shadow))[:3]}")
        for name, t in self.shadow.items():
            full = state_dict[name].to(dtype=t.dtype, device=t.device)
            t.copy_(distribute_tensor(full, t.device_mesh, t.placements) if isinstance(t, DTensor) else full)

    @torch.no_grad()
    def flush(self) -> None:
        """Deferred: apply the pending update now, on the current stream."""
        if self._pending is not None:
            self.join()
            self._apply_pending()

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The EMA weights under the model's names; sharded ones stay DTensors (what DCP saves and loads in place)."""
        self.flush()
        return dict(self.shadow)
