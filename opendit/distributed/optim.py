"""AdamW that updates each rank's local shards with one fused (or foreach) call over plain tensors."""
import torch

from opendit.distributed.ema import local_shard


class ShardedAdamW(torch.optim.AdamW):
    """torch.optim.AdamW with the same state (moments shaped and sharded like the parameters: what DCP saves and
    loads), whose update runs on the local shards: the DTensor path dispatches every parameter separately, which
    cost ~77 ms of CPU per DiT-XL/2 step (docs/benchmarks.md). Plain tensors pass through unchanged."""

    def _init_group(self, group, *tensor_lists):
        has_complex = super()._init_group(group, *tensor_lists)  # creates state on first use, fills the lists
        for tensors in tensor_lists:  # params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps
            tensors[:] = [local_shard(t) for t in tensors]
        return has_complex
