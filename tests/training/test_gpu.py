"""On 2 and 4 GPUs (NCCL): the plugins reproduce one process (nccl_equivalence.py); zero2 bf16, zero3 fp16 and ddp bf16
train through train.py, checkpoint, resume on one GPU, and export."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLAGS = ["--model", "DiT-S/2", "--depth", "2", "--image_size", "32", "--vae", "none", "--num_classes", "8", "--dataset", "shapes",
         "--dataset_size", "256", "--batch_size", "8", "--num_workers", "0", "--log_every", "1", "--max_steps", "4", "--ckpt_every", "2"]


GPU_COUNTS = [pytest.param(n, marks=pytest.mark.skipif(torch.cuda.device_count() < n, reason=f"needs {n} CUDA GPUs")) for n in (2, 4)]


def run(args, nproc, script="train.py"):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), os.path.join(ROOT, script), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("nproc", GPU_COUNTS)
def test_plugins_match_one_process_over_nccl(nproc):
    run([], nproc, script=os.path.join("tests", "parallel", "nccl_equivalence.py"))


@pytest.mark.parametrize("nproc", GPU_COUNTS)
@pytest.mark.parametrize("plugin,precision", [("zero2", "bf16"), ("zero3", "fp16"), ("ddp", "bf16")])
def test_train_resume_export_on_gpus(tmp_path, plugin, precision, nproc):
    run(FLAGS + ["--plugin", plugin, "--mixed_precision", precision, "--grad_checkpoint", "--outputs", str(tmp_path / "o")], nproc)
    (experiment,) = [os.path.join(tmp_path, "o", d) for d in os.listdir(tmp_path / "o")]
    with open(os.path.join(experiment, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(r["loss"] == r["loss"] and r["peak_mem_gib"] > 0 for r in records)
    run(FLAGS + ["--max_steps", "5", "--plugin", plugin, "--mixed_precision", precision, "--load", os.path.join(experiment, "checkpoints", "step-0000002")], 1)
    from opendit.checkpoint import export

    paths = export.main([experiment, "--output", str(tmp_path / "export")])
    assert os.path.getsize(paths["safetensors"]) > 0
