"""train.py and sample.py with --sequence_parallel_size 2 on 2 ranks (dp 1 x sp 2) give one process's losses / samples:
FastSeq and Ulysses on a DiT, DSP on a Latte."""
import json
import os

import pytest

from opendit.training import train as train_cli

RUN = ["--max_steps", "3", "--ckpt_every", "0"]
LATTE = ["--model", "Latte-S/1x2x2", "--use_video", "--num_frames", "4"]  # 4 frames of 8 x 8 tokens
CASES = {"fastseq": ([], "fastseq"), "ulysses": ([], "ulysses"), "latte-dsp": (LATTE, "dsp")}


def losses(out: str) -> dict:
    (experiment,) = [os.path.join(out, d) for d in os.listdir(out)]
    with open(os.path.join(experiment, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def train_rank(rank, world_size, argv):
    train_cli.main(argv)


@pytest.mark.parametrize("case", CASES)
def test_sequence_parallel_training_matches_one_process(dt, tmp_path, case):
    model, kind = CASES[case]
    single, parallel = str(tmp_path / "single"), str(tmp_path / "sp")
    train_cli.main(dt.flags + model + RUN + ["--outputs", single])
    sp_flags = ["--sequence_parallel_size", "2", "--sequence_parallel_type", kind, "--plugin", "ddp", "--outputs", parallel]
    dt.run(train_rank, 2, dt.flags + model + RUN + sp_flags)
    (experiment,) = os.listdir(parallel)
    assert "ddp over 2 processes (dp 1 x sp 2)" in open(os.path.join(parallel, experiment, "log.txt")).read()
    a, b = losses(single), losses(parallel)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5 * max(1.0, abs(a[step])), (step, a, b)


def sample_rank(rank, world_size, argv):
    from opendit.sampling import sample as sample_cli

    sample_cli.main(argv)


@pytest.mark.parametrize("case", CASES)
def test_sequence_parallel_sampling_matches_one_process(dt, tmp_path, case):
    model, kind = CASES[case]
    out = str(tmp_path / "train")
    train_cli.main(dt.flags + model + ["--max_steps", "2", "--outputs", out])
    (experiment,) = [os.path.join(out, d) for d in os.listdir(out)]
    flags = ["--ckpt", experiment, "--num_sampling_steps", "4", "--labels", "1,2", "--device", "cpu"]
    from opendit.sampling import sample as sample_cli

    one = sample_cli.main(flags + ["--output", str(tmp_path / "one")])
    dt.run(sample_rank, 2, flags + ["--output", str(tmp_path / "two"), "--sequence_parallel_size", "2", "--sequence_parallel_type", kind])
    import numpy as np
    from PIL import Image

    from opendit.utils.media import read_video

    for path in one["files"]:
        other = os.path.join(tmp_path / "two", os.path.basename(path))
        if path.endswith(".mp4"):  # the same frames, up to the codec's response to 8-bit rounding
            a, b = read_video(path).astype(np.int16), read_video(other).astype(np.int16)
            assert a.shape == b.shape and np.abs(a - b).mean() < 1.0, path
        else:
            a, b = np.asarray(Image.open(path), dtype=np.int16), np.asarray(Image.open(other), dtype=np.int16)
            assert np.abs(a - b).max() <= 1, path  # equal up to 8-bit rounding of float noise
