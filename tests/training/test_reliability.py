"""Issue 14: exact resume with DataLoader workers, the divergence guard, resume rules, --load auto fallback, metrics,
one-line errors for bad checkpoints and data, SIGTERM, and the experiment lock."""
import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from ranks import TRAIN_FLAGS  # tests/ranks.py (tests/conftest.py puts tests/ on sys.path)
from opendit.checkpoint import dcp
from opendit.checkpoint.dcp import read_tensors
from opendit.data.image import ImageFolderDataset
from opendit.errors import UsageError
from opendit.training import train as train_cli
from opendit.training.preemption import ExperimentLock

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FOLDER_FLAGS = [f if f != "shapes" else "folder" for f in TRAIN_FLAGS]


def metrics(experiment: str) -> dict:
    with open(os.path.join(experiment, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def run(argv: list) -> int:
    try:
        train_cli.main(argv)
    except SystemExit as e:
        return e.code
    return 0


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    """An asymmetric image folder (random flips matter), 2 classes x 8 images, and one corrupt file."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c in range(2):
        os.makedirs(root / f"c{c}")
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i}.png")
    (root / "c1" / "bad.png").write_bytes(b"not a png")
    return str(root)


def image_run(images, out, steps, workers, *extra):
    return run([*FOLDER_FLAGS, "--data_path", images, "--num_classes", "2", "--num_workers", str(workers), "--max_steps", str(steps),
                "--ckpt_every", "2", "--experiment_dir", str(out), *extra])


def trained_bad_reads(images: str, steps: int, batch_size: int = 4, seed: int = 42) -> int:
    """The unreadable reads behind the items of the first `steps` batches: the count a checkpoint keeps (workers'
    read-ahead beyond the step does not count)."""
    dataset = ImageFolderDataset(images, 16)
    bad = {i for i, (path, _) in enumerate(dataset.samples) if path.endswith("bad.png")}
    keys, epoch = [], 0
    while len(keys) < steps * batch_size:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        keys += order[: len(dataset) // batch_size * batch_size][: steps * batch_size - len(keys)]
        epoch += 1
    count = 0
    for i in keys:  # SkipBadSamples' replacement chain
        attempt = 0
        while i in bad:
            i, attempt, count = random.Random(i * 1_000_003 + attempt).randrange(len(dataset)), attempt + 1, count + 1
    return count


@pytest.mark.parametrize("workers", [0, 2, 4])
def test_resume_is_exact_with_workers_and_bad_sample_count_carried(images, tmp_path, workers):
    assert image_run(images, tmp_path / "full", 6, workers) == 0
    assert image_run(images, tmp_path / "cut", 2, workers) == 0
    assert image_run(images, tmp_path / "cut", 6, workers, "--load", "auto") == 0
    full, cut = metrics(tmp_path / "full"), metrics(tmp_path / "cut")
    assert sorted(cut) == list(range(1, 7)) and all(full[s]["loss"] == cut[s]["loss"] for s in full), (full, cut)
    assert "Dataset: ImageFolderDataset with 17 items" in open(tmp_path / "full" / "log.txt").read()  # not its SkipBadSamples wrapper
    for part in ("model", "ema"):
        a, b = (read_tensors(str(tmp_path / r / "checkpoints" / "step-0000006"), part) for r in ("full", "cut"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    states = [torch.load(tmp_path / r / "checkpoints" / "step-0000006" / "train_state.pt", weights_only=True) for r in ("full", "cut")]
    assert states[0]["bad_samples"] == states[1]["bad_samples"] == [trained_bad_reads(images, 6)]  # the count continues
    if workers == 2:  # and the items do not depend on the number of workers
        assert image_run(images, tmp_path / "w0", 6, 0) == 0
        assert all(metrics(tmp_path / "w0")[s]["loss"] == full[s]["loss"] for s in full)


def test_file_system_sharing_trains_the_same_steps(images, tmp_path):
    try:
        assert image_run(images, tmp_path / "fd", 4, 2) == 0
        assert image_run(images, tmp_path / "fs", 4, 2, "--sharing_strategy", "file_system") == 0
        assert torch.multiprocessing.get_sharing_strategy() == "file_system"
    finally:
        torch.multiprocessing.set_sharing_strategy("file_descriptor")  # the strategy is global to this process
    a, b = metrics(tmp_path / "fd"), metrics(tmp_path / "fs")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4] and all(a[s]["loss"] == b[s]["loss"] for s in a)


def test_file_system_sharing_without_its_manager_is_one_line(monkeypatch):
    def fail(self):
        raise RuntimeError("error executing torch_shm_manager at \"/x/torch_shm_manager\" at \"../torch/lib/libshm/core.cpp\":64")

    monkeypatch.setattr(torch.Tensor, "share_memory_", fail)
    try:
        with pytest.raises(UsageError, match=r"^--sharing_strategy file_system: error executing torch_shm_manager .* \(use file_descriptor\)$"):
            train_cli.use_sharing_strategy("file_system")
    finally:
        torch.multiprocessing.set_sharing_strategy("file_descriptor")


def _zero2(rank, world_size, argv):
    train_cli.main(argv)


def test_zero2_resume_exact_with_workers(images, tmp_path):
    """zero2 on 2 processes with 2 workers each, via torchrun (forked test ranks cannot start workers)."""
    def torchrun(out, steps, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", os.path.join(ROOT, "train.py"), *FOLDER_FLAGS,
               "--data_path", images, "--num_classes", "2", "--num_workers", "2", "--batch_size", "2", "--max_steps", str(steps), "--ckpt_every", "2",
               "--plugin", "zero2", "--experiment_dir", str(out), *extra]
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert result.returncode == 0, result.stderr[-2000:]
    torchrun(tmp_path / "full", 4)
    torchrun(tmp_path / "cut", 2)
    torchrun(tmp_path / "cut", 4, "--load", "auto")
    full, cut = metrics(tmp_path / "full"), metrics(tmp_path / "cut")
    assert all(full[s]["loss"] == cut[s]["loss"] for s in full) and sorted(cut) == [1, 2, 3, 4]
    for part in ("model", "ema"):  # the sharded weights and EMA of step 4, gathered from both ranks' DCP shards
        a, b = (read_tensors(str(tmp_path / r / "checkpoints" / "step-0000004"), part) for r in ("full", "cut"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


def test_divergence_is_skipped_then_stops_and_no_bad_checkpoint(tmp_path, monkeypatch, capsys):
    real = train_cli.prepare_batch
    calls = []

    def poisoned(*args, **kwargs):  # from step 3 on, every batch is NaN
        x, kw = real(*args, **kwargs)
        calls.append(1)
        return (x * float("nan") if len(calls) >= 3 else x), kw

    monkeypatch.setattr(train_cli, "prepare_batch", poisoned)
    out = tmp_path / "run"
    assert run([*TRAIN_FLAGS, "--max_steps", "20", "--ckpt_every", "2", "--max_bad_steps", "3", "--experiment_dir", str(out)]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training diverged: 3 steps in a row" in err[0] and "step-0000004" in err[0] and "by step 5" in err[0]
    lines = open(out / "metrics.jsonl").read().splitlines()
    records = [json.loads(line) for line in lines]  # strict JSON: NaN written as null
    assert "NaN" not in "".join(lines) and records[2]["loss"] is None
    assert open(out / "checkpoints" / "latest").read().strip() == "step-0000004"  # skipped steps 3-4 left the weights good
    for part in ("model", "ema"):
        assert all(torch.isfinite(t).all() for t in read_tensors(str(out / "checkpoints" / "step-0000004"), part).values())
    assert "step(s) skipped: non-finite loss" in open(out / "log.txt").read()


def test_run_ending_inside_non_finite_steps_stops_as_diverged(tmp_path, monkeypatch, capsys):
    real = train_cli.prepare_batch
    calls = []

    def poisoned(*args, **kwargs):  # steps 3 and 4 (the last two) are NaN: fewer than --max_bad_steps in a row
        x, kw = real(*args, **kwargs)
        calls.append(1)
        return (x * float("nan") if len(calls) >= 3 else x), kw

    monkeypatch.setattr(train_cli, "prepare_batch", poisoned)
    out = tmp_path / "run"
    assert run([*TRAIN_FLAGS, "--max_steps", "4", "--ckpt_every", "2", "--experiment_dir", str(out)]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training ended inside 2 step(s) in a row with a non-finite loss" in err[0] and "step-0000002" in err[0], err
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step-0000002"]  # no checkpoint at the last step
    assert "Done!" not in open(out / "log.txt").read()


def test_skipped_step_leaves_weights_optimizer_and_ema_untouched(tmp_path, monkeypatch):
    from opendit.training.step import TrainStep

    snapshots = {}
    real_call = TrainStep.__call__

    def spy(self, x, kw):
        if x.isnan().any():
            before = ([p.detach().clone() for p in self.params], {k: v.clone() for k, v in self.ema.shadow.items()},
                      [{k: v.clone() for k, v in s.items()} for s in self.optimizer.state.values()])
            result = real_call(self, x, kw)
            after = ([p.detach() for p in self.params], self.ema.shadow, list(self.optimizer.state.values()))
            snapshots["same"] = all(torch.equal(a, b) for a, b in zip(before[0], after[0])) and all(torch.equal(before[1][k], after[1][k]) for k in before[1]) \
                and all(torch.equal(a[k], b[k]) for a, b in zip(before[2], after[2]) for k in a)
            return result
        return real_call(self, x, kw)

    real = train_cli.prepare_batch
    count = []

    def poisoned(*args, **kwargs):
        x, kw = real(*args, **kwargs)
        count.append(1)
        return (x * float("nan") if len(count) == 3 else x), kw

    monkeypatch.setattr(TrainStep, "__call__", spy)
    monkeypatch.setattr(train_cli, "prepare_batch", poisoned)
    assert run([*TRAIN_FLAGS, "--max_steps", "4", "--ckpt_every", "2", "--experiment_dir", str(tmp_path / "r")]) == 0
    assert snapshots["same"] is True


def test_non_finite_weights_are_never_checkpointed(tmp_path, monkeypatch, capsys):
    from opendit.training.step import TrainStep

    real = TrainStep._step

    def corrupt(self, bad):
        out = real(self, bad)
        if self.scheduler.last_epoch == 3:  # after step 3: a NaN weight that the guard cannot see
            self.params[0].data[0] = float("nan")
        return out

    monkeypatch.setattr(TrainStep, "_step", corrupt)
    out = tmp_path / "run"
    assert run([*TRAIN_FLAGS, "--max_steps", "6", "--ckpt_every", "2", "--experiment_dir", str(out)]) == 4
    assert "refusing to write the step-4 checkpoint" in capsys.readouterr().err
    assert open(out / "checkpoints" / "latest").read().strip() == "step-0000002"


@pytest.fixture
def four_steps(tmp_path):
    out = tmp_path / "run"
    assert run([*TRAIN_FLAGS, "--max_steps", "4", "--ckpt_every", "2", "--experiment_dir", str(out)]) == 0
    return out


def test_changed_flags_on_resume_take_effect_and_are_logged(four_steps, capsys):
    assert run([*TRAIN_FLAGS, "--max_steps", "6", "--ckpt_every", "3", "--lr", "3e-4", "--lr_schedule", "cosine", "--load", "auto",
                "--experiment_dir", str(four_steps)]) == 0
    assert metrics(four_steps)[5]["lr"] == pytest.approx(3e-4 * 0.5 * (1 + math.cos(math.pi * 4 / 6)))  # the new rate and schedule, at step 5
    (line,) = [line for line in open(four_steps / "log.txt") if "Resume:" in line]
    assert line.split("Resume: ")[1].strip() == ("changed flags: --ckpt_every 3 (was 2), --lr 0.0003 (was 0.0001), --max_steps 6 (was 4), "
                                                 "--lr_schedule cosine (was constant)")  # not --load nor --experiment_dir


def test_changed_seed_on_resume_is_refused_and_config_kept(four_steps, capsys):
    config = open(four_steps / "config.json").read()
    assert run([*TRAIN_FLAGS, "--max_steps", "6", "--global_seed", "7", "--load", "auto", "--experiment_dir", str(four_steps)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--global_seed 7" in err[0]
    assert open(four_steps / "config.json").read() == config


def test_corrupt_metadata_is_one_line_and_config_untouched(four_steps, capsys):
    step = four_steps / "checkpoints" / "step-0000004"
    size = os.path.getsize(step / ".metadata")
    (step / ".metadata").write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR." .ljust(size, b" "))
    dcp._write_manifest(str(step), dcp._own_files(str(step), 0))  # a forged manifest: sizes and CRC-32s match
    config = open(four_steps / "config.json").read()
    assert run([*TRAIN_FLAGS, "--max_steps", "6", "--load", str(step), "--lr", "1e-3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unreadable DCP metadata" in err and "Traceback" not in err
    assert open(four_steps / "config.json").read() == config


def test_load_auto_falls_back_to_newest_intact_and_dedups_metrics(four_steps, capsys):
    with open(four_steps / "metrics.jsonl", "a") as f:  # a crashed run had logged steps 5 and 6 past the checkpoint
        f.write(json.dumps({"step": 5, "loss": 1.0}) + "\n" + json.dumps({"step": 6, "loss": 1.0}) + "\n")
    with open(four_steps / "checkpoints" / "step-0000004" / "train_state.pt", "ab") as f:
        f.write(b"x")  # damaged: size differs from the manifest
    assert run([*TRAIN_FLAGS, "--max_steps", "6", "--ckpt_every", "2", "--load", "auto", "--experiment_dir", str(four_steps)]) == 0
    assert "resuming from the newest intact checkpoint" in capsys.readouterr().err
    assert "Resumed from" in open(four_steps / "log.txt").read() and "at step 2" in open(four_steps / "log.txt").read()
    steps = [json.loads(line)["step"] for line in open(four_steps / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_live_lock_refuses_and_stale_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    os.makedirs(out / "checkpoints")
    lock = ExperimentLock(str(out))  # a live run holds it
    assert run([*TRAIN_FLAGS, "--max_steps", "1", "--experiment_dir", str(out)]) == 2
    assert "in use by a live run" in capsys.readouterr().err
    lock.release()
    (out / ".lock").write_text("999999 otherhost\n")  # left by a dead run: no flock held
    assert run([*TRAIN_FLAGS, "--max_steps", "1", "--experiment_dir", str(out)]) == 0


def test_sigterm_checkpoints_and_exits_3_then_resume_is_exact(tmp_path):
    flags = [*TRAIN_FLAGS, "--max_steps", "200", "--ckpt_every", "1000"]
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *flags, "--experiment_dir", str(tmp_path / "cut")], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "cut" / "metrics.jsonl").exists():
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 3, proc.stderr.read()[-2000:]
    last = max(metrics(tmp_path / "cut"))
    assert open(tmp_path / "cut" / "checkpoints" / "latest").read().strip() == f"step-{last:07d}"  # nothing lost
    target = last + 2
    assert run([*TRAIN_FLAGS, "--max_steps", str(target), "--load", "auto", "--experiment_dir", str(tmp_path / "cut")]) == 0
    assert run([*TRAIN_FLAGS, "--max_steps", str(target), "--experiment_dir", str(tmp_path / "full")]) == 0
    full, cut = metrics(tmp_path / "full"), metrics(tmp_path / "cut")
    assert all(full[s]["loss"] == cut[s]["loss"] for s in full)


def _children(pid: int) -> list:
    """Processes whose parent is pid (torchrun's workers), from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1] == str(pid):
                found.append(int(entry))
        except (OSError, IndexError):
            continue
    return found


def test_sigusr1_on_one_rank_stops_both_ranks_with_a_checkpoint(tmp_path):
    """zero2 on 2 processes: a signal to one worker alone; the ranks agree to stop, write one checkpoint, exit 3."""
    def torchrun(out, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", os.path.join(ROOT, "train.py"), *TRAIN_FLAGS,
               "--plugin", "zero2", "--ckpt_every", "1000", "--experiment_dir", str(out), *extra]
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))

    agent = torchrun(tmp_path / "cut", "--max_steps", "500")
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "cut" / "metrics.jsonl").exists():
        time.sleep(0.2)
    time.sleep(0.5)
    workers = _children(agent.pid)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGUSR1)  # rank 0 never sees a signal
    err = agent.communicate(timeout=120)[1]
    # Both ranks agree to stop and save; the first to exit (status 3) makes torchrun end the other, which may already be gone.
    assert agent.returncode != 0 and "exitcode  : 3" in err and "exitcode  : 1 " not in err, err[-3000:]
    last = max(metrics(tmp_path / "cut"))
    assert last < 500 and open(tmp_path / "cut" / "checkpoints" / "latest").read().strip() == f"step-{last:07d}"  # nothing lost
    resumed = torchrun(tmp_path / "cut", "--max_steps", str(last + 2), "--load", "auto")
    full = torchrun(tmp_path / "full", "--max_steps", str(last + 2))
    assert resumed.wait(timeout=300) == 0 and full.wait(timeout=300) == 0
    a, b = metrics(tmp_path / "full"), metrics(tmp_path / "cut")
    assert all(a[s]["loss"] == b[s]["loss"] for s in a)
