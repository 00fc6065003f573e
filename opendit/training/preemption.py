"""Preemption and exclusive use: SIGTERM / SIGUSR1 end training after the current step with a checkpoint (status 3),
and a lock file keeps a second run out of an experiment folder that a live run is using."""
import fcntl
import os
import signal
import socket
from typing import Optional

import torch
import torch.distributed as dist

from opendit.errors import UsageError

PREEMPTED_STATUS = 3  # a graceful stop on SIGTERM / SIGUSR1: a checkpoint was written, requeue with --load auto
LOCK_FILE = ".lock"


class Preempted(Exception):
    """Raised after the preemption checkpoint is written; train.py's main exits with PREEMPTED_STATUS."""


class StopSignals:
    """Records SIGTERM / SIGUSR1 instead of dying; should_stop() is True on every rank once any rank got one.
    One process: the flag itself. Several: a MAX all-reduce of the flag every `every` steps (1 on CPU, where it
    costs nothing; 10 on GPUs, to keep host syncs out of most steps)."""

    def __init__(self, device: torch.device):
        self.received: Optional[int] = None
        self.device = device
        self.every = 1 if device.type == "cpu" else 10
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def should_stop(self, step: int) -> bool:
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return self.received is not None
        if step % self.every:
            return False
        flag = torch.tensor(int(self.received is not None), device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_DFL)


class ExperimentLock:
    """{experiment}/.lock holding `pid host`, flock-ed while the run lives: the kernel drops the lock when the process
    dies (kill -9 included), so a stale file from a dead run is simply taken over."""

    def __init__(self, experiment_dir: str):
        self.path = os.path.join(experiment_dir, LOCK_FILE)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = os.pread(self.fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            raise UsageError(f"{experiment_dir} is in use by a live run (pid host: {owner}); wait for it to end or use another --experiment_dir") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock; the file stays (harmless)
            self.fd = None
