"""EpochBatches: epoch after epoch and from a resumed point, the batches each epoch's shuffled order gives, from one
DataLoader iterator whose workers are forked once."""
import os

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from opendit.data.seeded import EpochSeeded
from opendit.training.sampler import EpochBatches, EpochBatchSampler, ResumableSampler


class KeyItems(Dataset):
    """Item i is (i, the process that made it)."""

    def __len__(self) -> int:
        return 22

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor([index, os.getpid()])


def make_loader(workers: int, epochs: int = 3) -> tuple:
    dataset = EpochSeeded(KeyItems(), seed=0)
    sampler = ResumableSampler(dataset, num_replicas=2, rank=1, shuffle=True, seed=3, drop_last=True)
    return DataLoader(dataset, batch_sampler=EpochBatchSampler(sampler, 3, epochs), num_workers=workers), sampler


def expected_batches(epoch: int, consumed: int) -> list:
    """This rank's batches of the epoch, straight from a fresh sampler's order (each epoch's remainder dropped)."""
    sampler = ResumableSampler(KeyItems(), num_replicas=2, rank=1, shuffle=True, seed=3, drop_last=True)
    indices = sampler.epoch_indices(epoch, consumed)
    return [indices[b * 3 : b * 3 + 3] for b in range(len(indices) // 3)]


@pytest.mark.parametrize("workers", [0, 2])
def test_epoch_batches_follow_each_epochs_order_with_workers_forked_once(workers):
    loader, _ = make_loader(workers)
    epoch_batches = EpochBatches(loader)
    got, pids = [], set()
    for epoch in range(3):
        batches = [batch for batch in epoch_batches(epoch, 4 if epoch == 0 else 0)]
        got.append([b[:, 0].tolist() for b in batches])
        pids |= {int(p) for b in batches for p in b[:, 1]}
    assert got == [expected_batches(0, 4), expected_batches(1, 0), expected_batches(2, 0)]
    assert [len(b) for b in got] == [3, 3, 3] and got[1] != got[2]  # 22 items, 2 ranks: 11 each, 9 from item 4
    assert pids == {os.getpid()} if workers == 0 else (len(pids) <= workers and os.getpid() not in pids)


def test_the_epoch_is_part_of_each_items_key():
    loader, _ = make_loader(0)
    assert loader.batch_sampler.start == (0, 0) and len(loader.batch_sampler) == 3 + 3 + 3
    keys = next(iter(loader.batch_sampler))
    assert all(epoch == 0 for epoch, _ in keys) and len(keys) == 3
    dataset = loader.dataset
    assert torch.equal(dataset[5], dataset[(0, 5)])  # a plain index is the first epoch's item


def test_a_stop_mid_epoch_continues_the_same_iterator_and_a_jump_starts_afresh():
    loader, _ = make_loader(2, epochs=5)
    epoch_batches = EpochBatches(loader)
    first = next(iter(epoch_batches(0, 0)))[:, 0].tolist()  # the loop stopped after one batch (max_steps)
    iterator = epoch_batches.iterator
    assert epoch_batches.position == (0, 6)  # 3 items on each of 2 ranks
    rest = [b[:, 0].tolist() for b in epoch_batches(0, 6)]
    assert epoch_batches.iterator is iterator and [first] + rest == expected_batches(0, 0)
    assert epoch_batches.position == (1, 0)
    again = [b[:, 0].tolist() for b in epoch_batches(0, 0)]  # not epoch 1: epoch 0 replays from a new iterator
    assert again == expected_batches(0, 0) and epoch_batches.iterator is not iterator
