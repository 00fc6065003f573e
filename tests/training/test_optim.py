"""ShardedAdamW steps FSDP2's DTensor shards as plain local tensors (no DTensor dispatch) and keeps AdamW's state layout."""
import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from opendit.training.optim import ShardedAdamW
from opendit.parallel.mesh import build_mesh
from opendit.parallel.parallelize import parallelize


class DTensorOps(TorchDispatchMode):
    """Records the aten ops that receive a DTensor argument."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(isinstance(a, DTensor) for a in tree_leaves((args, kwargs or {}))):
            self.ops.append(func)
        return func(*args, **(kwargs or {}))


def local_step(rank, world_size, dt):
    dt.init()
    model = dt.tiny_model()
    parallelize(model, mesh=build_mesh(world_size, 1, dt.device_type), plugin="zero2", param_dtype=torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]  # pos_embed is frozen
    opt = ShardedAdamW(params, lr=1e-2, weight_decay=0.01, foreach=True)
    for step in range(2):
        opt.zero_grad(set_to_none=True)
        dt.loss_on(model, step, rank, world_size).backward()
        before = [p._local_tensor.clone() for p in params]
        with DTensorOps() as seen:
            opt.step()
        moved = [not torch.equal(b, p._local_tensor) for b, p in zip(before, params) if b.numel()]
        assert all(moved), f"step {step}: {sum(moved)} of {len(moved)} local shards updated"
        # Step 0 creates the moments as DTensors (zeros_like); every later update touches plain local tensors only.
        assert step == 0 or not seen.ops, f"step {step}: DTensor ops {sorted(set(map(str, seen.ops)))}"
    state = opt.state[model.blocks[0].mlp.fc1.weight]
    assert sorted(state) == ["exp_avg", "exp_avg_sq", "step"] and isinstance(state["exp_avg"], DTensor) and float(state["step"]) == 2
    assert torch.optim.AdamW(params).state_dict()["param_groups"][0].keys() == opt.state_dict()["param_groups"][0].keys()


def test_sharded_adamw_updates_local_shards_without_dtensor_dispatch(dt):
    dt.run(local_step, 2, dt)
