"""The data order of an epoch, resumable mid-epoch on the same or another number of ranks, and epochs fed back to back."""
import torch
from torch.utils.data import DistributedSampler


class ResumableSampler(DistributedSampler):
    """A DistributedSampler (drop_last) that starts start_index items into the epoch's shuffled order, counted over
    all ranks: a resumed epoch continues exactly where it stopped, on the same or a different number of ranks."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.start_index = 0

    def __iter__(self):
        if self.shuffle:  # the same order as DistributedSampler's
            order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(len(self.dataset)))
        end = self.start_index + len(self) * self.num_replicas
        return iter(order[self.start_index + self.rank : end : self.num_replicas])

    def __len__(self) -> int:
        return max(0, (self.total_size - self.start_index) // self.num_replicas)

    def resume_epoch(self, loader, epoch: int, consumed: int):
        """loader, set to yield the batches of `epoch` from `consumed` items in (counted over all ranks)."""
        self.set_epoch(epoch)
        self.start_index = consumed
        if hasattr(loader.dataset, "set_epoch"):  # per-item randomness from (seed, epoch, index); workers copy it at iter()
            loader.dataset.set_epoch(epoch)
        return loader


class EpochBatches:
    """The batches of one epoch after another. With worker processes, the next epoch's loader starts (workers forked,
    first batches made) while this epoch's last `lead` batches train, so the first step of an epoch does not wait."""

    def __init__(self, loader, sampler: ResumableSampler, epochs: int, lead: int = 2):
        self.loader, self.sampler, self.epochs, self.lead = loader, sampler, epochs, lead
        self.ahead = None  # ((epoch, consumed), iterator, batches) of an epoch started early

    def _start(self, epoch: int, consumed: int) -> tuple:
        iterator = iter(self.sampler.resume_epoch(self.loader, epoch, consumed))  # the order is drawn here, at iter()
        return (epoch, consumed), iterator, len(iterator)

    def __call__(self, epoch: int, consumed: int):
        """Yields the batches of `epoch` from `consumed` items in (counted over all ranks)."""
        ahead, self.ahead = self.ahead, None
        _, iterator, batches = ahead if ahead is not None and ahead[0] == (epoch, consumed) else self._start(epoch, consumed)
        early = self.loader.num_workers > 0 and epoch + 1 < self.epochs  # without workers the loop's process reads the data
        for i, batch in enumerate(iterator):
            if early and i == max(batches - self.lead, 0):
                self.ahead = self._start(epoch + 1, 0)
            yield batch
