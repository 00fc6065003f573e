"""Samplers that choose training timesteps (importance sampling to reduce loss variance)."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch as th
import torch.distributed as dist


def create_named_schedule_sampler(name: str, diffusion):
    """Build a ScheduleSampler by name: "uniform" or "loss-second-moment"."""
    if name == "uniform":
        return UniformSampler(diffusion)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion)
    raise NotImplementedError(f"unknown schedule sampler: {name}")


class ScheduleSampler(ABC):
    """A distribution over timesteps; returned weights make the loss estimate unbiased."""

    @abstractmethod
    def weights(self) -> np.ndarray:
        """Unnormalised positive weight per timestep."""

    def sample(self, batch_size: int, device):
        """Draw timesteps; return (indices, importance weights) as tensors on `device`."""
        w = self.weights()
        probs = w / np.sum(w)
        idx_np = np.random.choice(len(probs), size=(batch_size,), p=probs)
        indices = th.from_numpy(idx_np).long().to(device)
        weights_np = 1.0 / (len(probs) * probs[idx_np])
        weights = th.from_numpy(weights_np).float().to(device)
        return indices, weights


class UniformSampler(ScheduleSampler):
    """Every timestep equally likely."""

    def __init__(self, diffusion):
        self.diffusion = diffusion
        self._weights = np.ones([diffusion.num_timesteps])

    def weights(self):
        """Constant weights."""
        return self._weights


class LossAwareSampler(ScheduleSampler):
    """A sampler whose weights are updated from observed per-timestep losses."""

    def update_with_local_losses(self, local_ts: th.Tensor, local_losses: th.Tensor) -> None:
        """Gather (timestep, loss) pairs from every rank (or just this process) and update."""
        if not (dist.is_available() and dist.is_initialized()):
            self.update_with_all_losses(local_ts.tolist(), local_losses.tolist())
            return

        world = dist.get_world_size()
        sizes = [th.tensor([0], dtype=th.int32, device=local_ts.device) for _ in range(world)]
        dist.all_gather(sizes, th.tensor([len(local_ts)], dtype=th.int32, device=local_ts.device))
        sizes = [int(s.item()) for s in sizes]
        longest = max(sizes)

        # all_gather needs equal shapes: pad every rank's batch to the longest one.
        ts_bufs = [th.zeros(longest, dtype=local_ts.dtype, device=local_ts.device) for _ in sizes]
        loss_bufs = [th.zeros(longest, dtype=local_losses.dtype, device=local_losses.device) for _ in sizes]
        ts_pad = th.zeros(longest, dtype=local_ts.dtype, device=local_ts.device)
        loss_pad = th.zeros(longest, dtype=local_losses.dtype, device=local_losses.device)
        ts_pad[: len(local_ts)] = local_ts
        loss_pad[: len(local_losses)] = local_losses
        dist.all_gather(ts_bufs, ts_pad)
        dist.all_gather(loss_bufs, loss_pad)

        timesteps = [x.item() for buf, n in zip(ts_bufs, sizes) for x in buf[:n]]
        losses = [x.item() for buf, n in zip(loss_bufs, sizes) for x in buf[:n]]
        self.update_with_all_losses(timesteps, losses)

    @abstractmethod
    def update_with_all_losses(self, ts, losses) -> None:
        """Update the weights from lists of timesteps and their losses (same on every rank)."""


class LossSecondMomentResampler(LossAwareSampler):
    """Sample t with probability proportional to sqrt(E[L_t^2]) once each step has a full history."""

    def __init__(self, diffusion, history_per_term: int = 10, uniform_prob: float = 0.001):
        self.diffusion = diffusion
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self._loss_history = np.zeros([diffusion.num_timesteps, history_per_term], dtype=np.float64)
        self._loss_counts = np.zeros([diffusion.num_timesteps], dtype=int)

    def weights(self):
        """Uniform until warmed up, then RMS loss per timestep mixed with a little uniform mass."""
        if not self._warmed_up():
            return np.ones([self.diffusion.num_timesteps], dtype=np.float64)
        w = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        w /= np.sum(w)
        w *= 1 - self.uniform_prob
        w += self.uniform_prob / len(w)
        return w

    def update_with_all_losses(self, ts, losses):
        """Append each loss to its timestep's ring of the most recent `history_per_term` values."""
        for t, loss in zip(ts, losses):
            if self._loss_counts[t] == self.history_per_term:
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def _warmed_up(self) -> bool:
        """True once every timestep has a full loss history."""
        return bool((self._loss_counts == self.history_per_term).all())
