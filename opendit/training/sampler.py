"""The data order of an epoch, resumable mid-epoch on the same or another number of ranks, and the epochs fed back to
back through one DataLoader iterator."""
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler


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
        return self.items_from(self.start_index)

    def items_from(self, consumed: int) -> int:
        """This rank's items of an epoch from `consumed` items in (counted over all ranks)."""
        return max(0, (self.total_size - consumed) // self.num_replicas)

    def epoch_indices(self, epoch: int, consumed: int) -> list:
        """This rank's indices of `epoch` from `consumed` items in (counted over all ranks)."""
        self.set_epoch(epoch)
        self.start_index = consumed
        return list(self)


class EpochBatchSampler(Sampler):
    """This rank's batches of (epoch, index) keys, epoch after epoch from `start` = (epoch, consumed), each epoch's
    remainder dropped: a DataLoader iterator over it serves the whole run, its workers forked once (EpochSeeded reads
    the epoch from the key)."""

    def __init__(self, sampler: ResumableSampler, batch_size: int, epochs: int):
        self.sampler, self.batch_size, self.epochs = sampler, batch_size, epochs
        self.start = (0, 0)

    def batches(self, consumed: int) -> int:
        """How many batches an epoch has from `consumed` items in."""
        return self.sampler.items_from(consumed) // self.batch_size

    def _epochs(self):
        """(epoch, items consumed before it starts) from `start` to the last epoch."""
        first, consumed = self.start
        return ((epoch, consumed if epoch == first else 0) for epoch in range(first, self.epochs))

    def __iter__(self):
        for epoch, consumed in self._epochs():
            indices = self.sampler.epoch_indices(epoch, consumed)  # drawn as the loader reaches the epoch
            for b in range(len(indices) // self.batch_size):
                yield [(epoch, i) for i in indices[b * self.batch_size : (b + 1) * self.batch_size]]

    def __len__(self) -> int:
        return sum(self.batches(consumed) for _, consumed in self._epochs())


class EpochBatches:
    """The batches of one epoch after another from one DataLoader iterator: the next epoch's first batches are made
    while this epoch's last ones train, and no workers are forked between epochs."""

    def __init__(self, loader: DataLoader):
        assert isinstance(loader.batch_sampler, EpochBatchSampler), "the loader's batch_sampler is an EpochBatchSampler"
        self.loader, self.batch_sampler = loader, loader.batch_sampler
        self.iterator, self.position = None, None  # the iterator's next batch: (epoch, consumed)

    def __call__(self, epoch: int, consumed: int):
        """Yields the batches of `epoch` from `consumed` items in (counted over all ranks)."""
        if self.iterator is None or self.position != (epoch, consumed):  # the first call, or a jump (not the loop's order)
            self.batch_sampler.start = (epoch, consumed)
            self.iterator = iter(self.loader)
        step = self.batch_sampler.batch_size * self.batch_sampler.sampler.num_replicas  # items per batch over all ranks
        batches = self.batch_sampler.batches(consumed)
        for b in range(batches):
            batch = next(self.iterator)
            self.position = (epoch + 1, 0) if b + 1 == batches else (epoch, consumed + (b + 1) * step)
            yield batch
