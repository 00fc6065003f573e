"""train.py --profile_steps: the chosen steps profiled into {experiment}/profile/ without changing a loss; bad values refused."""
import json
import os

import pytest
import torch

from opendit.errors import UsageError
from opendit.training import train as train_cli
from opendit.training.profile import busy_us, idle_gaps, parse_steps

TINY = ["--model", "DiT-S/2", "--depth", "1", "--hidden_size", "32", "--num_heads", "2", "--image_size", "16", "--vae", "none",
        "--num_classes", "8", "--dataset", "shapes", "--dataset_size", "32", "--batch_size", "4", "--mixed_precision", "fp32",
        "--num_workers", "0", "--log_every", "1", "--max_steps", "4"]


def losses(experiment) -> list:
    with open(experiment / "metrics.jsonl") as f:
        return [json.loads(line)["loss"] for line in f]


def test_profile_steps_writes_a_trace_and_a_summary(tmp_path):
    train_cli.main(TINY + ["--outputs", str(tmp_path / "plain")])
    train_cli.main(TINY + ["--profile_steps", "2-3", "--outputs", str(tmp_path / "profiled")])
    plain, profiled = (tmp_path / name / os.listdir(tmp_path / name)[0] for name in ("plain", "profiled"))
    assert losses(profiled) == losses(plain)
    assert not (plain / "profile").exists()
    with open(profiled / "profile" / "trace.json") as f:
        assert json.load(f)["traceEvents"]
    summary = (profiled / "profile" / "summary.md").read_text()
    assert summary.startswith("# Steps profiled: 2,") and "Host operations" in summary and "aten::" in summary


def test_profile_steps_past_the_end_still_writes(tmp_path):
    train_cli.main(TINY + ["--profile_steps", "3-9", "--outputs", str(tmp_path)])
    assert (tmp_path / os.listdir(tmp_path)[0] / "profile" / "summary.md").read_text().startswith("# Steps profiled: 2,")


@pytest.mark.parametrize("value, message", [("5", "expected FIRST-LAST"), ("3-2", "expected FIRST-LAST"), ("0-2", "expected FIRST-LAST"),
                                            ("a-b", "expected FIRST-LAST"), ("7-8", "starts after --max_steps 4")])
def test_bad_profile_steps_are_one_line(value, message):
    with pytest.raises(UsageError, match=f"--profile_steps {value}: {message}"):
        parse_steps(value, 4)


def test_busy_time_is_the_union_of_intervals():
    assert busy_us([(0, 10), (5, 10), (30, 5), (31, 1)]) == 20
    assert busy_us([]) == 0


def test_idle_gaps_are_the_longest_waits_with_what_the_host_did():
    kernels = [(0, 10, "a", 7), (5, 10, "b", 7), (40, 5, "c", 7), (46, 4, "d", 7)]  # idle 15-40 and 45-46
    host = [(0, 60, "train step 3"), (20, 30, "enumerate(DataLoader)"), (25, 5, "fork"), (45, 2, "aten::copy_")]
    assert idle_gaps(kernels, host) == [(15, 25, "3", "enumerate(DataLoader) > fork"), (45, 1, "3", "enumerate(DataLoader) > aten::copy_")]
    assert idle_gaps(kernels, host, top=1) == [(15, 25, "3", "enumerate(DataLoader) > fork")]
    assert idle_gaps(kernels[:1], host) == [] and idle_gaps([], host) == []
    assert idle_gaps(kernels, [])[0] == (15, 25, "between steps", "no recorded operation")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make test-gpu on the GPU machine)")
def test_profile_steps_on_gpu_report_the_busy_share_and_kernels(tmp_path):
    train_cli.main(TINY + ["--profile_steps", "3-4", "--outputs", str(tmp_path)])
    summary = (tmp_path / os.listdir(tmp_path)[0] / "profile" / "summary.md").read_text()
    assert "GPU busy" in summary and "| kernel (top 20 by GPU time) |" in summary and "## The GPU's longest waits" in summary
