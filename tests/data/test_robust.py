"""Bad samples are replaced (batch size kept) and counted across DataLoader workers, or stop the run in one line; a
crashing worker never hangs the job."""

import logging
import os
import signal
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from opendit.errors import UsageError
from opendit.data.robust import BadSampleError, SkipBadSamples


class Flaky(Dataset):
    """Items {"x": i}; the listed indices raise like an unreadable file."""

    is_latent, has_text, num_classes = False, False, 0

    def __init__(self, n, bad):
        self.n, self.bad = n, set(bad)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i in self.bad:
            raise OSError(f"/data/clip{i}.mp4: Invalid data found when processing input")
        return {"x": torch.tensor(float(i))}


@pytest.fixture
def warnings_log():
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("opendit")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)


def test_skip_replaces_deterministically_and_logs_a_count(warnings_log):
    ds = SkipBadSamples(Flaky(10, bad=[3, 4]), "skip")
    first = ds[3]["x"]
    assert ds[3]["x"] == first and int(first) not in (3, 4)  # the same replacement every time (exact resume)
    assert ds.skipped.value == 2 and ds.num_classes == 0  # attributes pass through
    messages = [r.getMessage() for r in warnings_log]
    assert messages[0].startswith("Skipped bad sample #1 (item 3, using item ") and "/data/clip3.mp4: Invalid data" in messages[0]
    assert messages[1].startswith("Skipped bad sample #2")


def test_count_is_shared_by_workers_and_batches_stay_full():
    ds = SkipBadSamples(Flaky(24, bad=range(0, 24, 3)), "skip")
    loader = DataLoader(ds, batch_size=4, num_workers=2)
    sizes = [len(batch["x"]) for batch in loader]
    assert sizes == [4] * 6
    assert ds.skipped.value >= 8  # every bad index was met at least once (replacements may hit bad ones too)


def test_error_mode_is_one_line_even_from_a_worker():
    loader = DataLoader(SkipBadSamples(Flaky(4, bad=[1]), "error"), batch_size=2, num_workers=1)
    with pytest.raises(UsageError) as info:
        list(loader)
    assert isinstance(info.value, BadSampleError)
    assert str(info.value) == "bad sample (--on_bad_sample error): /data/clip1.mp4: Invalid data found when processing input"


def test_nothing_readable_stops_after_max_retries():
    with pytest.raises(BadSampleError, match="5 unreadable samples in a row; the first: /data/clip0.mp4"):
        SkipBadSamples(Flaky(3, bad=[0, 1, 2]), "skip", max_retries=5)[0]


class Segfault(Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        os.kill(os.getpid(), signal.SIGSEGV)  # what a crashing decoder does to a worker


def test_a_crashing_worker_does_not_hang():
    loader = DataLoader(SkipBadSamples(Segfault(), "skip"), batch_size=2, num_workers=1)
    with pytest.raises(RuntimeError, match="DataLoader worker .* (exited unexpectedly|killed by signal)"):
        list(loader)


def test_train_py_stops_when_a_worker_crashes(tmp_path, media):
    """Through train.py: the decoder segfaults inside a DataLoader worker; the run must end (non-zero), not hang."""
    video = media.video(tmp_path / "v.mp4", 8, 32, 32)
    (tmp_path / "clips.csv").write_text(f"{video},a clip\n{video},the same clip\n")
    script = (
        "import os, signal, sys\n"
        "import opendit.data.video as video\n"
        "real = video.read_clip\n"
        "video.read_clip = lambda *a, **k: os.kill(os.getpid(), signal.SIGSEGV) if os.getpid() != MAIN else real(*a, **k)\n"
        "MAIN = os.getpid()\n"
        "from opendit.training.train import main\n"
        "main(sys.argv[1:])\n"
    )
    args = ["--model", "VDiT-S/1x2x2", "--use_video", "--depth", "1", "--hidden_size", "32", "--num_heads", "2", "--image_size", "16",
            "--num_frames", "2", "--vae", "none", "--num_classes", "1", "--batch_size", "2", "--max_steps", "2", "--mixed_precision", "fp32",
            "--num_workers", "1", "--captions", "off", "--data_path", str(tmp_path / "clips.csv"), "--outputs", str(tmp_path / "out")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode != 0
    assert "DataLoader worker" in result.stderr
