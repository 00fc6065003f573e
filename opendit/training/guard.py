"""The divergence guard: a step whose loss or gradient norm is not finite is skipped on every rank.

Design: the step computes one boolean `bad` on the device (non-finite loss on any rank, all-reduced as a MAX, or a
non-finite global gradient norm, which FSDP has already all-reduced), so every rank takes the same decision.
  * CUDA with the fused AdamW: `bad` is handed to the optimizer as `found_inf` (the mechanism GradScaler uses): the
    fused kernel leaves parameters, moments and step counts untouched, and the EMA update is weighted by `bad`, all
    on the device, so the normal path has no host synchronisation. Consecutive-bad counters live on the device and
    are read at log steps and before each checkpoint (`check`), which stops the run after --max_bad_steps in a row
    (and at the last step inside any run of them).
  * CPU (and any non-fused optimizer): reading the flag costs nothing, so the step reads it and does not call the
    optimizer or the EMA at all; `check` runs every step, so the run stops exactly at the max_bad_steps-th bad step.
  * fp16: GradScaler already skips overflowing steps and shrinks the scale; only a non-finite loss counts as bad.
"""
import torch
import torch.distributed as dist


class DivergenceError(RuntimeError):
    """Training diverged (too many non-finite steps in a row, or non-finite weights at a checkpoint); one line."""


def any_rank(flag: torch.Tensor) -> torch.Tensor:
    """flag (a 0-d bool tensor) OR-ed over all ranks, without a host synchronisation."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        flag = flag.to(torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.bool()


class DivergenceGuard:
    """Counts non-finite steps on the device: in a row (now and the longest run since the last check) and in total."""

    def __init__(self, device: torch.device, max_bad_steps: int):
        self.max_bad_steps = max_bad_steps
        self.run = torch.zeros((), dtype=torch.int64, device=device)  # bad steps in a row, up to now
        self.longest = torch.zeros((), dtype=torch.int64, device=device)  # longest run since the last check
        self.total = torch.zeros((), dtype=torch.int64, device=device)
        self.reported = 0

    def record(self, bad: torch.Tensor) -> None:
        bad = bad.to(torch.int64)
        self.run.add_(bad).mul_(bad)
        torch.maximum(self.longest, self.run, out=self.longest)
        self.total.add_(bad)

    def check(self, step: int, last_good: str, logger, end: bool = False) -> None:
        """Log newly skipped steps; raise DivergenceError after max_bad_steps in a row, or at the end of the run (`end`)
        inside any run of them: the weights a final checkpoint would hold are those the non-finite steps came from."""
        longest, total, run = (int(v) for v in torch.stack([self.longest, self.total, self.run]).tolist())
        if total > self.reported:
            logger.warning(f"(step={step:07d}) {total - self.reported} step(s) skipped: non-finite loss or gradient norm (weights, optimizer and EMA left unchanged)")
            self.reported = total
        self.longest.copy_(self.run)
        if longest >= self.max_bad_steps:
            raise DivergenceError(f"training diverged: {longest} steps in a row with a non-finite loss or gradient norm (by step {step}); "
                                  f"resume from the last good checkpoint ({last_good}) with a lower --lr")
        if end and run:
            raise DivergenceError(f"training ended inside {run} step(s) in a row with a non-finite loss or gradient norm (by step {step}): no final checkpoint written; "
                                  f"resume from the last good checkpoint ({last_good}) with a lower --lr")


def non_finite_tensors(tensors) -> torch.Tensor:
    """True (a 0-d bool tensor, OR-ed over ranks) when any floating tensor holds a NaN or an infinity."""
    flags = [~torch.isfinite(t).all() for t in tensors if torch.is_floating_point(t) and t.numel()]
    bad = torch.stack(flags).any() if flags else torch.zeros((), dtype=torch.bool)
    return any_rank(bad)
