"""train.py on 2 ranks (zero2): stop at step 2 and resume -> the same losses; resume on 1 process; a rank killed under
`torchrun --max-restarts 1` restarts the job, which continues from the last checkpoint with the same losses."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from opendit.training import train as train_cli
from opendit.checkpoint.dcp import read_tensors

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUN = ["--max_steps", "4", "--ckpt_every", "2", "--plugin", "zero2"]


def losses(experiment: str) -> dict:
    with open(os.path.join(experiment, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def train_rank(rank, world_size, argv):
    train_cli.main(argv)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, dt):
    """A 4-step zero2 run on 2 ranks with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("outputs")
    dt.run(train_rank, 2, dt.flags + RUN + ["--outputs", str(out)])
    (experiment,) = [os.path.join(out, d) for d in os.listdir(out)]
    return experiment


def test_layout_and_sharded_files(uninterrupted):
    step = os.path.join(uninterrupted, "checkpoints", "step-0000002")
    assert {"__0_0.distcp", "__1_0.distcp", "rng-00000.pt", "rng-00001.pt", "train_state.pt", "manifest.json"} <= set(os.listdir(step))
    assert sorted(losses(uninterrupted)) == [1, 2, 3, 4]
    log = open(os.path.join(uninterrupted, "log.txt")).read()
    assert "zero2 over 2 processes (dp 2 x sp 1)" in log


def test_resume_on_two_ranks_gives_identical_losses(dt, uninterrupted, tmp_path):
    copy = str(tmp_path / "run")
    shutil.copytree(uninterrupted, copy)
    os.remove(os.path.join(copy, "metrics.jsonl"))
    dt.run(train_rank, 2, dt.flags + RUN + ["--load", os.path.join(copy, "checkpoints", "step-0000002")])
    resumed, original = losses(copy), losses(uninterrupted)
    assert sorted(resumed) == [3, 4] and all(resumed[s] == original[s] for s in (3, 4)), (resumed, original)
    for part in ("ema", "model"):  # the sharded EMA and weights continue exactly too
        a, b = (read_tensors(os.path.join(run, "checkpoints", "step-0000004"), part) for run in (copy, uninterrupted))
        assert all(torch.equal(a[k], b[k]) for k in a), part


def test_resume_on_one_process_reshards(dt, uninterrupted, tmp_path):
    copy = str(tmp_path / "run")
    shutil.copytree(uninterrupted, copy)
    train_cli.main(dt.flags + ["--max_steps", "3", "--load", os.path.join(copy, "checkpoints", "step-0000002"), "--peak_tflops", "1"])
    log = open(os.path.join(copy, "log.txt")).read()
    assert "Resuming on 1 process from a run on 2: the RNG restarts" in log and "Resumed from" in log
    with open(os.path.join(copy, "metrics.jsonl")) as f:
        last = [json.loads(line) for line in f][-1]
    assert last["step"] == 3 and 0 < last["mfu"] < 1 and last["images_per_sec_per_gpu"] > 0
    assert os.path.isdir(os.path.join(copy, "checkpoints", "step-0000003"))


def test_killed_rank_restarts_and_resumes(dt, uninterrupted, tmp_path):
    """Rank 1 dies after step 3 (before that step is logged or saved); torchrun restarts both ranks, train.py finds
    the run's experiment folder by the run id and resumes from step 2: steps 3 and 4 match the uninterrupted run."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--max-restarts", "1",
           os.path.join(ROOT, "train.py"), *dt.flags, *RUN, "--outputs", str(tmp_path)]
    env = dict(os.environ, OPENDIT_TEST_KILL="1:3", OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=400, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    (experiment,) = [os.path.join(tmp_path, d) for d in os.listdir(tmp_path)]
    assert losses(experiment) == losses(uninterrupted)
    log = open(os.path.join(experiment, "log.txt")).read()
    assert "Resumed from" in log and log.count("Experiment folder") == 2


def test_experiment_dir_needs_load_auto_to_resume(dt, uninterrupted, tmp_path, capsys):
    copy = str(tmp_path / "run")
    shutil.copytree(uninterrupted, copy)
    with pytest.raises(SystemExit):
        train_cli.main(dt.flags + ["--max_steps", "4", "--experiment_dir", copy])
    assert "add --load auto" in capsys.readouterr().err
    train_cli.main(dt.flags + ["--max_steps", "4", "--experiment_dir", copy, "--load", "auto"])  # step 4 >= 4: nothing to do
    assert "Nothing to do" in open(os.path.join(copy, "log.txt")).read()


def test_truncated_checkpoint_is_one_line_error_and_previous_loads(dt, uninterrupted, tmp_path, capsys):
    copy = str(tmp_path / "run")
    shutil.copytree(uninterrupted, copy)
    shard = os.path.join(copy, "checkpoints", "step-0000004", "__1_0.distcp")
    with open(shard, "r+b") as f:
        f.truncate(100)
    with pytest.raises(SystemExit) as exit_code:
        train_cli.main(dt.flags + ["--max_steps", "5", "--load", copy])  # the experiment's latest: step 4
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_code.value.code == 2 and len(err) == 1 and err[0].startswith("error:") and "truncated checkpoint (__1_0.distcp" in err[0]
    train_cli.main(dt.flags + ["--max_steps", "3", "--load", os.path.join(copy, "checkpoints", "step-0000002")])
    assert "Resumed from" in open(os.path.join(copy, "log.txt")).read()
