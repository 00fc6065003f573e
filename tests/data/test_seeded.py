"""EpochSeeded: each (epoch, index) key draws from torch's CPU generator seeded by item_seed, and nothing else's."""

import pytest
import torch
from torch.utils.data import Dataset

from opendit.data.seeded import EpochSeeded, item_seed


class Draws(Dataset):
    """Item i is four draws from torch's CPU generator."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.rand(4)


def test_each_key_draws_from_the_cpu_generator_seeded_by_its_item_seed():
    dataset = EpochSeeded(Draws(), seed=7)
    for epoch, index in [(0, 3), (2, 3), (2, 9)]:
        assert torch.equal(dataset[(epoch, index)], torch.rand(4, generator=torch.Generator().manual_seed(item_seed(7, epoch, index))))
    assert torch.equal(dataset[5], dataset[(0, 5)])  # a plain index is epoch 0
    assert not torch.equal(dataset[(0, 5)], dataset[(1, 5)])


def test_the_callers_cpu_generator_is_restored_and_no_accelerator_generator_is_seeded(monkeypatch):
    """torch.manual_seed would also reseed every GPU's generator (training's noise, with 0 workers) and, where CUDA is
    not initialised (a DataLoader worker), format a stack trace per item."""
    seeded = []
    for module in (torch.cuda, torch.cuda.random):
        monkeypatch.setattr(module, "manual_seed_all", lambda seed: seeded.append(seed))
        monkeypatch.setattr(module, "manual_seed", lambda seed: seeded.append(seed))
    state = torch.get_rng_state()
    EpochSeeded(Draws(), seed=7)[(1, 2)]
    assert seeded == []
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_items_read_in_the_training_process_leave_the_gpus_generator_alone():
    """With 0 workers the items are read where training draws its timesteps and noise on the GPU."""
    torch.cuda.manual_seed(5)
    state = torch.cuda.get_rng_state()
    EpochSeeded(Draws(), seed=7)[(1, 2)]
    assert torch.equal(torch.cuda.get_rng_state(), state)
