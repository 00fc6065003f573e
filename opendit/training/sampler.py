"""The data order of an epoch, resumable mid-epoch on the same or another number of ranks."""
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
