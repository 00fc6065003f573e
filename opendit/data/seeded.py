"""Per-item randomness from (seed, epoch, index): the same augmentation whatever the number of DataLoader workers,
and after a resume (worker RNG streams depend on how many workers there are and where the epoch started)."""

import numpy as np
import torch
from torch.utils.data import Dataset


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed mixing the run's seed, the epoch and the item index (SeedSequence: no collisions in practice)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0]) >> 1


class EpochSeeded(Dataset):
    """Wraps a dataset: the key (e, i), item i of epoch e, draws its flip, crop and clip window from torch's CPU RNG
    seeded by item_seed(seed, e, i), restoring the caller's RNG afterwards; a plain index i is item i of epoch 0."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __getattr__(self, name: str):
        if name == "dataset":  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.dataset, name)  # is_latent, num_classes, has_text, skipped, ...

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (0, key)
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only: torch.manual_seed also seeds every GPU's (training's noise, with 0 workers), and
            # where CUDA is not initialised (a worker) it formats a stack trace per call, half of a shapes item's time.
            torch.default_generator.manual_seed(item_seed(self.seed, epoch, i))
            return self.dataset[i]
