"""EpochBatches: the same batches, epoch after epoch and from a resumed point, as one fresh loader per epoch."""
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from opendit.training.sampler import EpochBatches, ResumableSampler


class EpochItems(Dataset):
    """Item i of epoch e is (e, i): a batch shows which epoch's dataset state made it."""

    def __init__(self):
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return 22

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor([self.epoch, index])


def loader_and_sampler(workers: int) -> tuple:
    dataset = EpochItems()
    sampler = ResumableSampler(dataset, num_replicas=2, rank=1, shuffle=True, seed=3, drop_last=True)
    return DataLoader(dataset, batch_size=3, sampler=sampler, num_workers=workers, drop_last=True), sampler


@pytest.mark.parametrize("workers", [0, 2])
def test_epoch_batches_match_a_fresh_loader_per_epoch(workers):
    loader, sampler = loader_and_sampler(workers)
    expected = [[b.tolist() for b in sampler.resume_epoch(loader, epoch, 4 if epoch == 0 else 0)] for epoch in range(3)]
    loader, sampler = loader_and_sampler(workers)
    epoch_batches = EpochBatches(loader, sampler, epochs=3)
    got = []
    for epoch in range(3):
        batches = []
        for i, batch in enumerate(epoch_batches(epoch, 4 if epoch == 0 else 0)):
            batches.append(batch.tolist())
            if epoch == 0 and i == 1:  # this epoch has 3 batches; with workers the next starts before the last two
                assert (epoch_batches.ahead is not None and epoch_batches.ahead[0] == (1, 0)) == (workers > 0)
        got.append(batches)
    assert got == expected
    assert [len(b) for b in got] == [3, 3, 3] and all(item[0] == epoch for epoch, b in enumerate(got) for batch in b for item in batch)
    assert epoch_batches.ahead is None  # the last epoch starts none after it


def test_an_epoch_asked_for_out_of_turn_starts_afresh():
    loader, sampler = loader_and_sampler(2)
    epoch_batches = EpochBatches(loader, sampler, epochs=5)
    first = [b.tolist() for b in epoch_batches(0, 0)]
    assert epoch_batches.ahead[0] == (1, 0)
    again = [b.tolist() for b in epoch_batches(0, 0)]  # not epoch 1: the early one is dropped, epoch 0 replays
    assert again == first and epoch_batches.ahead[0] == (1, 0)
