"""sample_ddp.py resumes only what the same settings made: settings.json in the sample folder, a one-line refusal
naming the setting that differs, and an honest count of new and reused samples."""
import os

import pytest

from opendit.sampling import sample_ddp

FLAGS = ["--num_fid_samples", "3", "--per_proc_batch_size", "2", "--num_sampling_steps", "2", "--device", "cpu"]


def run(capsys, ckpt, sample_dir, *extra):
    capsys.readouterr()
    result = sample_ddp.main(["--ckpt", ckpt, "--sample_dir", str(sample_dir), *FLAGS, *extra])
    return result, capsys.readouterr().out


def refused(capsys, ckpt, sample_dir, *extra) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        sample_ddp.main(["--ckpt", ckpt, "--sample_dir", str(sample_dir), *FLAGS, *extra])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def snapshot(folder):
    return {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in os.listdir(folder)}


def test_bad_values_are_refused_before_anything_loads(tmp_path, capsys):
    for extra, words in ((["--cfg_scale", "nan"], "--cfg_scale nan"), (["--num_sampling_steps", "333", "--sampler", "ddim"], "--num_sampling_steps 333"),
                         (["--num_fid_samples", "0"], "--num_fid_samples 0")):
        err = refused(capsys, str(tmp_path / "missing.pt"), tmp_path / "s", *extra)
        assert words in err and "missing.pt" not in err
