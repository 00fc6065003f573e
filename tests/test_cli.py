"""train.py / sample.py end to end through their CLIs: train -> checkpoint -> resume -> sample, and bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from opendit.sampling import sample as sample_cli
from opendit.training import train as train_cli
from opendit.checkpoint.dcp import read_tensors, read_train_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "DiT-S/2", "--depth", "2", "--hidden_size", "32", "--num_heads", "2", "--image_size", "16", "--vae", "none",
        "--num_classes", "8", "--dataset", "shapes", "--dataset_size", "64", "--batch_size", "4", "--mixed_precision", "fp32",
        "--num_workers", "0", "--log_every", "1"]


SCHEDULE = ["--lr_schedule", "cosine", "--lr_warmup_steps", "2"]  # resume must restore the scheduler too


def test_lr_factor_warmup_and_cosine():
    from opendit.training.optim import lr_factor as f
    assert [f("constant", 2, 10, s) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert f("cosine", 0, 10, 0) == 1.0 and abs(f("cosine", 0, 10, 5) - 0.5) < 1e-12 and f("cosine", 0, 10, 10) == 0.0


def run_cli(script, *args):
    """Run an entry script in a fresh interpreter; returns the CompletedProcess."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def metrics(experiment):
    with open(os.path.join(experiment, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 6-step run with checkpoints every 3 steps."""
    out = tmp_path_factory.mktemp("outputs")
    train_cli.main(TINY + SCHEDULE + ["--max_steps", "6", "--ckpt_every", "3", "--outputs", str(out)])
    (experiment,) = [os.path.join(out, d) for d in os.listdir(out)]
    return experiment


def test_experiment_folder_layout(trained):
    assert os.path.basename(trained) == "000-DiT-S-2"
    for name in ("config.json", "log.txt", "metrics.jsonl", "checkpoints/latest", "checkpoints/step-0000003/manifest.json", "checkpoints/step-0000006/train_state.pt"):
        assert os.path.exists(os.path.join(trained, name)), name
    with open(os.path.join(trained, "checkpoints/latest")) as f:
        assert f.read().strip() == "step-0000006"
    records = metrics(trained)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(r["loss"]) and r["images_per_sec"] > 0 for r in records)
    lrs = [r["lr"] for r in records]
    assert lrs[0] == pytest.approx(5e-5) and lrs[1] == pytest.approx(1e-4) and lrs[5] < lrs[3] < 1e-4  # warmup, then cosine
    with open(os.path.join(trained, "config.json")) as f:
        config = json.load(f)
    assert config["model"] == {"model": "DiT-S/2", "input_size": 16, "in_channels": 3, "num_classes": 8, "depth": 2, "hidden_size": 32, "num_heads": 2}
    step6 = os.path.join(trained, "checkpoints/step-0000006")  # a DCP checkpoint (opendit/distributed/checkpoint.py)
    state = read_train_state(step6)
    assert state["step"] == 6 and set(state) >= {"scheduler", "scaler", "config", "consumed"}
    ema, weights = read_tensors(step6, "ema"), read_tensors(step6, "model")
    assert not torch.equal(ema["blocks.0.attn.qkv.weight"], weights["blocks.0.attn.qkv.weight"])


def test_resume_gives_identical_losses(trained, tmp_path):
    """Stopping at step 3 and resuming reproduces steps 4-6 of the uninterrupted run bit for bit (CPU, fp32)."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    os.remove(copy / "metrics.jsonl")
    train_cli.main(TINY + SCHEDULE + ["--max_steps", "6", "--ckpt_every", "3", "--load", str(copy / "checkpoints" / "step-0000003")])
    resumed = {r["step"]: r["loss"] for r in metrics(copy)}
    original = {r["step"]: r["loss"] for r in metrics(trained)}
    assert sorted(resumed) == [4, 5, 6]
    assert all(resumed[s] == original[s] for s in (4, 5, 6))
    a = read_tensors(str(copy / "checkpoints/step-0000006"), "ema")
    b = read_tensors(os.path.join(trained, "checkpoints/step-0000006"), "ema")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm-solver"])
def test_sample_from_checkpoint_is_seeded(trained, tmp_path, sampler):
    args = ["--ckpt", trained, "--num_sampling_steps", "3", "--labels", "0,5", "--per_class", "2", "--sampler", sampler, "--cfg_scale", "2.0"]
    first = sample_cli.main(args + ["--output", str(tmp_path / "a")])
    # Same seed -> same samples; the deterministic samplers also ignore how samples are batched.
    second = sample_cli.main(args + ["--output", str(tmp_path / "b")] + (["--batch_size", "3"] if sampler != "ddpm" else []))
    assert first["labels"] == [0, 0, 5, 5]
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == ["0000-class0.png", "0001-class0.png", "0002-class5.png", "0003-class5.png", "grid.png"]
    for name in names:
        a, b = np.array(Image.open(tmp_path / "a" / name)), np.array(Image.open(tmp_path / "b" / name))
        assert np.array_equal(a, b), name
    assert np.array(Image.open(tmp_path / "a" / "0000-class0.png")).shape == (16, 16, 3)


def test_sample_check_fidelity_writes_report(trained, tmp_path):
    result = sample_cli.main(["--ckpt", trained, "--num_sampling_steps", "2", "--labels", "all", "--output", str(tmp_path), "--check_fidelity", "--sampler", "ddim"])
    assert 0.0 <= result["fidelity"] <= 1.0 and os.path.exists(tmp_path / "fidelity.json")


def test_sample_official_layout_checkpoint_with_local_vae(tmp_path):
    """A plain state dict in Meta's key layout (like DiT-XL-2-256x256.pt) plus a VAE from a local folder."""
    from opendit.encoders.vae import tiny_vae
    from opendit.models import DiT_models

    vae = tiny_vae()  # downsample 2, 4 latent channels
    vae.model.save_pretrained(tmp_path / "vae")
    torch.manual_seed(0)
    model = DiT_models["DiT-S/4"](input_size=8, num_classes=1000)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    torch.save(model.state_dict(), tmp_path / "official.pt")
    result = run_cli("sample.py", "--model", "DiT-S/4", "--image_size", "16", "--vae", str(tmp_path / "vae"), "--ckpt", str(tmp_path / "official.pt"),
                     "--num_sampling_steps", "2", "--output", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    files = sorted(os.listdir(tmp_path / "out"))
    assert len(files) == 9 and "grid.png" in files  # DiT's eight default ImageNet classes
    assert "0000-class207.png" in files


def test_video_train_and_sample(tmp_path):
    train_cli.main(["--model", "VDiT-S/1x2x2", "--use_video", "--depth", "1", "--hidden_size", "32", "--num_heads", "2", "--image_size", "16", "--num_frames", "3",
                    "--vae", "none", "--num_classes", "8", "--dataset_size", "16", "--batch_size", "2", "--max_steps", "2", "--mixed_precision", "fp32",
                    "--num_workers", "0", "--outputs", str(tmp_path / "o")])
    experiment = os.path.join(tmp_path / "o", os.listdir(tmp_path / "o")[0])
    result = sample_cli.main(["--ckpt", experiment, "--num_sampling_steps", "2", "--labels", "1,2", "--output", str(tmp_path / "s")])
    assert sorted(os.listdir(tmp_path / "s")) == ["0000-class1.mp4", "0001-class2.mp4"]
    from opendit.utils.media import read_video

    assert read_video(result["files"][0]).shape == (3, 16, 16, 3)


def test_bf16_autocast_training_runs(tmp_path):
    train_cli.main(TINY[:-6] + ["--mixed_precision", "bf16", "--num_workers", "0", "--max_steps", "2", "--outputs", str(tmp_path)])
    experiment = os.path.join(tmp_path, os.listdir(tmp_path)[0])
    assert all(np.isfinite(r["loss"]) for r in metrics(experiment))


def test_torchrun_ddp_two_processes(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531", os.path.join(ROOT, "train.py"),
           *TINY, "--plugin", "ddp", "--max_steps", "3", "--outputs", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    experiment = os.path.join(tmp_path, os.listdir(tmp_path)[0])
    assert [r["step"] for r in metrics(experiment)] == [1, 2, 3]
    assert sorted(os.listdir(os.path.join(experiment, "checkpoints", "step-0000003"))) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "manifest.json", "rng-00000.pt", "rng-00001.pt", "train_state.pt"]
    assert "world size 2" in open(os.path.join(experiment, "log.txt")).read()


def one_line_error(result, *needles):
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_bad_flags_give_one_line_errors(tmp_path):
    out = ["--outputs", str(tmp_path)]
    one_line_error(run_cli("train.py", "--model", "DiT-Q/2", *out), "--model DiT-Q/2")
    one_line_error(run_cli("train.py", "--model", "DiT-S/2", "--image_size", "20", *out), "--image_size 20", "16")
    one_line_error(run_cli("train.py", *TINY, "--image_size", "12", *out), "--image_size 12")
    one_line_error(run_cli("train.py", "--image_size", "260", "--model", "DiT-XL/2", *out), "--image_size 260", "16")
    one_line_error(run_cli("train.py", *TINY, "--enable_flashattn", *out), "--enable_flashattn", "CUDA")
    one_line_error(run_cli("train.py", *TINY, "--sequence_parallel_size", "2", *out), "--sequence_parallel_size", "must divide")
    one_line_error(run_cli("train.py", "--model", "VDiT-S/1x2x2", *out), "--use_video")
    one_line_error(run_cli("train.py", *TINY, "--fsdp_blocks_per_unit", "0", *out), "--fsdp_blocks_per_unit 0", "at least 1")
    one_line_error(run_cli("train.py", *TINY, "--snr_gamma", "-1", *out), "--snr_gamma -1", "at least 0")
    one_line_error(run_cli("train.py", *TINY, "--load", str(tmp_path / "nope"), *out), "nope")
    one_line_error(run_cli("sample.py", "--ckpt", str(tmp_path / "missing.pt")), "missing.pt")


@pytest.mark.parametrize("script, argv", [("train.py", ["--mixed_precision", "fp8"]), ("sample.py", ["--ckpt", "x", "--bogus"]),
                                          ("sample_ddp.py", ["--ckpt", "x", "--per_proc_batch_size", "2.5"])])
def test_argparse_errors_are_short(script, argv):
    """A mistyped flag or value: one usage line pointing at --help, then the error, not every flag's usage."""
    result = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, cwd=ROOT, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 2, lines
    assert lines[0] == f"usage: {script} [flags]  ({script} --help lists them)" and lines[1].startswith(f"{script}: error: ")


def test_bad_checkpoints_give_one_line_errors(tmp_path):
    (tmp_path / "truncated.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    one_line_error(run_cli("sample.py", "--ckpt", str(tmp_path / "truncated.pt"), "--vae", "none"), "truncated.pt")
    # A pickle that would run code is refused: weights_only loading never executes it.
    torch.save({"model": {}, "evil": Image.new("RGB", (1, 1))}, tmp_path / "code.pt")
    one_line_error(run_cli("sample.py", "--ckpt", str(tmp_path / "code.pt"), "--vae", "none"), "code.pt", "weights-only")
    from opendit.models import DiT_models

    torch.save(DiT_models["DiT-S/8"](input_size=8, num_classes=10).state_dict(), tmp_path / "other.pt")
    one_line_error(run_cli("sample.py", "--ckpt", str(tmp_path / "other.pt"), "--model", "DiT-S/2", "--image_size", "16", "--vae", "none", "--num_classes", "10"), "do not fit")
