"""The multi-process equivalence checks of test_parallelize_equivalence.py and ../training/test_optim.py on GPUs over
NCCL (tests/training/test_gpu.py runs it):

    torchrun --standalone --nproc_per_node N tests/parallel/nccl_equivalence.py

zero2 / zero3 / DDP reproduce one process's gradients, weights and EMA; the sharded EMA equals an unsharded one; an
fp16 overflow on one rank skips the step everywhere; ShardedAdamW steps the local shards without DTensor dispatch.
"""
import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))  # sys.path[0] when the script runs
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "training")]
import ranks as conftest  # noqa: E402  (tests/ranks.py)
from test_optim import local_step  # noqa: E402  (tests/training/test_optim.py)
from test_parallelize_equivalence import compare_plugins, overflow  # noqa: E402


def main() -> None:
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 comparisons, as on CPU

    def init() -> None:  # each check calls dt.init(); the NCCL group is made once
        if not dist.is_initialized():
            dist.init_process_group("nccl", device_id=device)

    dt = SimpleNamespace(init=init, tiny_model=lambda: conftest.tiny_model().to(device), loss_on=conftest.loss_on, full=conftest.full, device_type="cuda")
    for check in (compare_plugins, overflow, local_step):
        check(rank, world_size, dt)
        if rank == 0:
            print(f"{check.__name__}: ok on {world_size} GPUs", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
