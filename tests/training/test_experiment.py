"""Experiment folders and --load: an earlier run's files are never replaced by a new run, and --load says what a path
is when it cannot be resumed (missing, a file, an export, a run without checkpoints, another model)."""
import json
import os

import pytest
from ranks import TRAIN_FLAGS  # tests/ranks.py (tests/conftest.py puts tests/ on sys.path)

from opendit.training import train as train_cli


def run(argv: list, capsys) -> tuple:
    """(exit status, stderr lines) of train.py in this process."""
    try:
        train_cli.main(argv)
        status = 0
    except SystemExit as e:
        status = e.code
    return status, capsys.readouterr().err.strip().splitlines()


def make_failed_run(folder):
    """The files of a run that failed before its first checkpoint."""
    os.makedirs(folder / "checkpoints")
    for name, text in (("config.json", '{"args": {}}'), ("log.txt", "old log\n"), ("metrics.jsonl", '{"step": 1, "loss": 1.0}\n')):
        (folder / name).write_text(text)
    return folder


@pytest.fixture
def failed_run(tmp_path):
    return make_failed_run(tmp_path / "failed")


def test_earlier_run_without_checkpoints_is_refused_and_kept(failed_run, capsys):
    before = {name: (failed_run / name).read_text() for name in ("config.json", "log.txt", "metrics.jsonl")}
    status, err = run([*TRAIN_FLAGS, "--max_steps", "1", "--experiment_dir", str(failed_run)], capsys)
    assert status == 2 and len(err) == 1, err
    assert err[0] == (f"error: --experiment_dir {failed_run}: holds an earlier run without checkpoints (config.json, log.txt, metrics.jsonl); "
                      "use another folder or remove it (--load auto restarts that run from step 0, replacing them)")
    assert {name: (failed_run / name).read_text() for name in before} == before


def test_load_auto_and_torchrun_restart_start_it_again(tmp_path, capsys, monkeypatch):
    rerun = make_failed_run(tmp_path / "rerun")
    assert run([*TRAIN_FLAGS, "--max_steps", "1", "--experiment_dir", str(rerun), "--load", "auto"], capsys)[0] == 0  # the rerun command
    assert json.loads((rerun / "config.json").read_text())["args"]["max_steps"] == 1
    restarted = make_failed_run(tmp_path / "restarted")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # torchrun --max-restarts started this job again
    assert run([*TRAIN_FLAGS, "--max_steps", "1", "--experiment_dir", str(restarted)], capsys)[0] == 0
    assert json.loads((restarted / "config.json").read_text())["args"]["max_steps"] == 1


def test_empty_or_unrelated_folder_is_used(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("kept")
    assert run([*TRAIN_FLAGS, "--max_steps", "1", "--experiment_dir", str(tmp_path / "mine")], capsys)[0] == 0
    assert (tmp_path / "mine" / "notes.txt").read_text() == "kept"


def test_load_paths_that_cannot_resume_say_what_they_are(tmp_path, failed_run, capsys):
    (tmp_path / "weights.pt").write_bytes(b"x")
    export = tmp_path / "exported"
    export.mkdir()
    (export / "model.safetensors").write_bytes(b"x")
    (export / "config.json").write_text(json.dumps({"model": {}, "args": {}, "weights": "ema", "source": "/runs/000-DiT-S-2/checkpoints/step-0000004"}))
    for path, message in ((tmp_path / "nope", "no such file or folder"),
                          (tmp_path / "weights.pt", "is a file; --load takes a checkpoint or experiment folder"),
                          (export, "an export (weights only, for sample.py --ckpt), not a resumable checkpoint; pass the training checkpoint or "
                                   "experiment folder it was exported from (/runs/000-DiT-S-2/checkpoints/step-0000004)"),
                          (failed_run, "an experiment folder without a checkpoint (its run ended before writing one)")):
        status, err = run([*TRAIN_FLAGS, "--max_steps", "1", "--load", str(path), "--outputs", str(tmp_path / "out")], capsys)
        assert status == 2 and err == [f"error: --load {path}: {message}"]
    assert not os.path.exists(tmp_path / "out")


def test_video_checkpoint_into_an_image_run_names_the_model(tmp_path, capsys):
    video = ["--model", "Latte-S/1x2x2", "--use_video", "--num_frames", "2", "--dataset_size", "8"]
    assert run([*TRAIN_FLAGS, *video, "--max_steps", "1", "--experiment_dir", str(tmp_path / "video")], capsys)[0] == 0
    status, err = run([*TRAIN_FLAGS, "--max_steps", "2", "--load", str(tmp_path / "video")], capsys)
    step = tmp_path / "video" / "checkpoints" / "step-0000001"
    assert status == 2 and err == [f"error: --model DiT-S/2: the checkpoint {step} trained Latte-S/1x2x2; resuming cannot change the model (start a new run)"]


def test_load_with_another_experiment_dir_is_refused(tmp_path, capsys):
    """--load resumes in the checkpoint's own experiment folder; another --experiment_dir would be silently ignored."""
    assert run([*TRAIN_FLAGS, "--max_steps", "1", "--experiment_dir", str(tmp_path / "a")], capsys)[0] == 0
    status, err = run([*TRAIN_FLAGS, "--max_steps", "2", "--load", str(tmp_path / "a"), "--experiment_dir", str(tmp_path / "b")], capsys)
    assert status == 2 and len(err) == 1 and err[0].startswith(f"error: --experiment_dir {tmp_path / 'b'}: --load {tmp_path / 'a'} resumes in its own"), err
    assert not (tmp_path / "b").exists()
    assert run([*TRAIN_FLAGS, "--max_steps", "2", "--load", str(tmp_path / "a"), "--experiment_dir", str(tmp_path / "a")], capsys)[0] == 0
