"""Process-group setup for torchrun (NCCL on GPU, gloo on CPU) and small rank helpers."""
import atexit
import faulthandler
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from opendit.errors import UsageError


@dataclass
class DistInfo:
    """Where this process sits: rank, world size, local rank and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_world_size() -> int:
    """torchrun's WORLD_SIZE: the number of processes launched together (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup_distributed(device: str = "auto") -> DistInfo:
    """Initialise the default process group when launched by torchrun (WORLD_SIZE > 1); pick the device."""
    world_size = launched_world_size()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available here (use --device cpu or auto)")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", store=_attempt_store(rank, world_size), rank=rank, world_size=world_size, device_id=dev if use_cuda else None)
    return DistInfo(rank, world_size, local_rank, dev)


def _attempt_store(rank: int, world_size: int) -> dist.Store:
    """The env:// store, with keys prefixed by torchrun's restart count: after a restart (--max-restarts) the agent's
    store still holds the dead attempt's addresses, which new ranks would otherwise race to connect to."""
    store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timedelta(minutes=10)))
    return dist.PrefixStore(f"default_pg/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over all ranks (a copy; the input is untouched)."""
    value = value.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def run_script(main: Callable[[], object]) -> None:
    """A script's main, then os._exit with its status once the process group is destroyed and Python's exit handlers
    ran (logs, metrics and worker processes closed, output flushed): the interpreter's own teardown is skipped. That
    teardown collects every module (0.8 s after a tiny sample.py on a 2-core CPU, 1.4-3.6 s after sample.py on the H200
    host: docs/benchmarks.md), and under torchrun a rank that finished before its peers could die in it of SIGABRT in
    C++ threads ("terminate called without an active exception"), failing a run that had written everything. An
    exception still raises (and exits) as usual; a torchrun rank that crashes also prints its Python stack."""
    if launched_world_size() > 1:
        faulthandler.enable(all_threads=True)
    try:
        main()
        status = 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    cleanup()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
