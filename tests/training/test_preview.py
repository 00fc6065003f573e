"""train.py --sample_every: EMA samples written during training, without changing a single loss."""
import json
import os

import numpy as np
from PIL import Image

from opendit.training import train as train_cli

TINY = ["--model", "DiT-S/2", "--depth", "1", "--hidden_size", "32", "--num_heads", "2", "--image_size", "16", "--vae", "none",
        "--num_classes", "8", "--dataset", "shapes", "--dataset_size", "32", "--batch_size", "4", "--mixed_precision", "fp32",
        "--num_workers", "0", "--log_every", "1", "--max_steps", "4", "--ema_decay", "0.5"]


def run(tmp_path, name, extra):
    out = tmp_path / name
    train_cli.main(TINY + extra + ["--outputs", str(out)])
    experiment = out / os.listdir(out)[0]
    with open(experiment / "metrics.jsonl") as f:
        return experiment, [json.loads(line)["loss"] for line in f]


def test_sample_every_writes_grids_and_keeps_losses(tmp_path, capsys):
    _, plain = run(tmp_path, "plain", [])
    capsys.readouterr()
    experiment, previewed = run(tmp_path, "preview", ["--sample_every", "2", "--ckpt_every", "2"])
    assert "25/25" not in capsys.readouterr().err  # no sampler progress bars between the log lines
    assert previewed == plain  # training's RNG untouched, bit for bit
    assert sorted(os.listdir(experiment / "samples")) == ["step-0000002", "step-0000004"]
    a, b = (np.array(Image.open(experiment / "samples" / s / "grid.png")) for s in ("step-0000002", "step-0000004"))
    assert a.shape == b.shape == (2 * 18 + 2, 4 * 18 + 2, 3)  # 8 images of 16 px, 4 per row, 2 px padding
    assert not np.array_equal(a, b)  # the EMA moved between the two


def test_resume_with_sample_every_is_exact(tmp_path):
    experiment, full = run(tmp_path, "full", ["--sample_every", "1", "--ckpt_every", "2"])
    os.remove(experiment / "metrics.jsonl")
    train_cli.main(TINY + ["--sample_every", "1", "--load", str(experiment / "checkpoints" / "step-0000002")])
    with open(experiment / "metrics.jsonl") as f:
        resumed = [json.loads(line)["loss"] for line in f]
    assert resumed == full[2:]


def test_sample_every_video_contact_sheet_and_mp4s(tmp_path):
    out = tmp_path / "video"
    train_cli.main(["--model", "VDiT-S/1x2x2", "--use_video", "--depth", "1", "--hidden_size", "32", "--num_heads", "2", "--image_size", "16",
                    "--num_frames", "3", "--vae", "none", "--num_classes", "8", "--dataset_size", "8", "--batch_size", "2", "--max_steps", "1",
                    "--mixed_precision", "fp32", "--num_workers", "0", "--sample_every", "1", "--outputs", str(out)])
    folder = out / os.listdir(out)[0] / "samples" / "step-0000001"
    assert sorted(os.listdir(folder)) == ["00.mp4", "01.mp4", "02.mp4", "03.mp4", "contact_sheet.png"]
    assert np.array(Image.open(folder / "contact_sheet.png")).shape == (4 * 18 + 2, 3 * 18 + 2, 3)  # a row per clip, a column per frame
    from opendit.utils.media import read_video

    assert read_video(str(folder / "00.mp4")).shape == (3, 16, 16, 3)


def test_sample_every_under_fsdp_gathers_the_sharded_ema(tmp_path):
    """zero2 on 2 gloo processes: every rank joins the EMA gather, rank 0 writes, the losses stay those of a run without."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    losses = {}
    for name, extra in (("plain", []), ("preview", ["--sample_every", "1"])):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", os.path.join(root, "train.py"), *TINY,
               "--max_steps", "2", "--batch_size", "2", "--plugin", "zero2", "--outputs", str(tmp_path / name), *extra]
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        experiment = tmp_path / name / os.listdir(tmp_path / name)[0]
        with open(experiment / "metrics.jsonl") as f:
            losses[name] = [json.loads(line)["loss"] for line in f]
    assert losses["preview"] == losses["plain"]
    assert sorted(os.listdir(experiment / "samples")) == ["step-0000001", "step-0000002"]
