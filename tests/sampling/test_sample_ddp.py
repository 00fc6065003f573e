"""sample_ddp.py resumes only what the same settings made: settings.json in the sample folder, a one-line refusal
naming the setting that differs, and an honest count of new and reused samples."""
import os

import pytest
from tiny import tiny_checkpoint

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


def test_rerun_with_other_settings_is_refused(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "a" / "tiny.pt")
    result, out = run(capsys, ckpt, tmp_path / "s")
    folder = result["folder"]
    assert "Saved 3 samples (3 new, 0 reused)" in out and os.path.isfile(os.path.join(folder, "settings.json"))
    before = snapshot(folder)
    for extra, words in ((["--num_sampling_steps", "3"], "--num_sampling_steps 2, this run has --num_sampling_steps 3"),
                         (["--sampler", "ddim"], "--sampler ddpm, this run has --sampler ddim"),
                         (["--use_model"], "no --use_model, this run has --use_model"),
                         (["--cfg_channels", "all"], "--cfg_channels all"),
                         (["--per_proc_batch_size", "1"], "--per_proc_batch_size 1")):
        err = refused(capsys, ckpt, tmp_path / "s", *extra)
        assert words in err and folder in err and "3 samples" in err, err
    # Another checkpoint whose file has the same name (so the same sample folder): its weights differ.
    other = tiny_checkpoint(tmp_path / "b" / "tiny.pt", seed=1)
    err = refused(capsys, other, tmp_path / "s")
    assert "other weights" in err and os.path.realpath(other) in err
    assert snapshot(folder) == before  # nothing rewritten, not even the .npz's PNGs


def test_resumed_run_reports_new_and_reused(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    result, _ = run(capsys, ckpt, tmp_path / "s")
    os.remove(os.path.join(result["folder"], "000002.png"))
    result, out = run(capsys, ckpt, tmp_path / "s")
    assert "Saved 3 samples (1 new, 2 reused)" in out and [os.path.basename(p) for p in result["written"]] == ["000002.png"]
    _, out = run(capsys, ckpt, tmp_path / "s", "--num_fid_samples", "1")
    assert "Saved 1 sample (0 new, 1 reused)" in out


def test_samples_without_settings_are_not_reused(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    result, _ = run(capsys, ckpt, tmp_path / "s")
    settings = os.path.join(result["folder"], "settings.json")
    os.remove(settings)  # as a folder written before the check existed
    err = refused(capsys, ckpt, tmp_path / "s")
    assert "no settings.json" in err and "3 samples" in err
    with open(settings, "w") as f:
        f.write("{ half")
    assert "not readable as JSON" in refused(capsys, ckpt, tmp_path / "s")


def test_bad_values_are_refused_before_anything_loads(tmp_path, capsys):
    for extra, words in ((["--cfg_scale", "nan"], "--cfg_scale nan"), (["--num_sampling_steps", "333", "--sampler", "ddim"], "--num_sampling_steps 333"),
                         (["--num_fid_samples", "0"], "--num_fid_samples 0")):
        err = refused(capsys, str(tmp_path / "missing.pt"), tmp_path / "s", *extra)
        assert words in err and "missing.pt" not in err
