"""Bad input at training time: an unreadable item is replaced by another (the batch keeps its size) and logged with
a running count of skipped items, or (`on_bad="error"`) stops the run with a one-line error. Preprocessing uses
`on_bad="drop"`: the item becomes None (logged and counted) for the collate to leave out."""

import logging
import multiprocessing
import random

from torch.utils.data import Dataset

from opendit.errors import UsageError


def error_line(e: BaseException) -> str:
    """An exception as one short line: its message's first line, or its type's name."""
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


class BadSampleError(UsageError):
    """An unreadable item under --on_bad_sample error, or too many in a row; one line even from a DataLoader worker."""

    def __init__(self, message: str):
        # A DataLoader re-raises a worker's exception with the whole traceback as its message: keep our last line.
        lines = [s for s in str(message).strip().splitlines() if s.strip()]
        if len(lines) > 1:
            message = lines[-1].split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message)


def inner_dataset(dataset: Dataset) -> Dataset:
    """The dataset under the wrappers that hold it as .dataset (SkipBadSamples, EpochSeeded): the one that names the data."""
    while "dataset" in vars(dataset):
        dataset = dataset.dataset
    return dataset


class SkipBadSamples(Dataset):
    """Wraps a dataset: item i that fails to load is replaced by a deterministic other index (or the run stops). Under
    "skip" an item (a dict) tells in "bad_reads" how many unreadable items it stands in for; `skipped` counts every
    replaced read of every worker, read-ahead included, for the log lines."""

    def __init__(self, dataset: Dataset, on_bad: str = "skip", max_retries: int = 100):
        if on_bad not in ("skip", "error", "drop"):
            raise UsageError(f"--on_bad_sample {on_bad}: choose skip or error")
        self.dataset, self.on_bad, self.max_retries = dataset, on_bad, max_retries
        self.skipped = multiprocessing.Value("q", 0)  # shared with the DataLoader workers, so the count is global

    def __getattr__(self, name: str):
        if name == "dataset":  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.dataset, name)  # is_latent, num_classes, has_text, ...

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        first_error = None
        for attempt in range(self.max_retries):
            try:
                item = self.dataset[i]
                if self.on_bad == "skip" and isinstance(item, dict):  # the loop counts the replaced reads it trains on
                    item = {**item, "bad_reads": attempt}
                return item
            except Exception as e:  # decoding errors come in many types (OSError, av.error.*, ValueError, ...)
                line = error_line(e)
                if self.on_bad == "error":
                    raise BadSampleError(f"bad sample (--on_bad_sample error): {line}") from None
                first_error = first_error or line
                with self.skipped.get_lock():
                    self.skipped.value += 1
                    count = self.skipped.value
                if self.on_bad == "drop":
                    logging.getLogger("opendit").warning(f"Dropped bad sample #{count} (item {i}): {line}")
                    return None
                replacement = random.Random(i * 1_000_003 + attempt).randrange(len(self.dataset))  # same on resume
                logging.getLogger("opendit").warning(f"Skipped bad sample #{count} (item {i}, using item {replacement}): {line}")
                i = replacement
        raise BadSampleError(f"{self.max_retries} unreadable samples in a row; the first: {first_error}")
