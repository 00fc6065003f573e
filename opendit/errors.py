"""User mistakes: one line on stderr and status 2, never a traceback."""
import sys
from typing import Any, Callable


class UsageError(ValueError):
    """A user mistake in flags or inputs; reported as one line, never a traceback."""


class CheckpointError(ValueError):
    """A checkpoint path that cannot be used; the message is one line naming it."""


def run_or_exit(fn: Callable[[Any], Any], args: Any) -> Any:
    """fn(args); a user mistake (UsageError, CheckpointError) ends the process with one line on stderr and status 2."""
    try:
        return fn(args)
    except (UsageError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        sys.exit(2)
