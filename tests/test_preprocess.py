"""preprocess.py: a UCF101-like tree (with the official split lists or OpenDiT's train/ layout) and any media folder to
CSV; a video dataset to a latent cache written by two torchrun ranks, then trained from."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from opendit import preprocess
from opendit.data.latents import LatentDataset
from opendit.training import train as train_cli
from opendit.utils.media import save_video

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["ApplyEyeMakeup", "BoxingPunchingBag", "YoYo"]


def clip(path, frames=6):
    torch.manual_seed(len(str(path)))
    save_video(torch.rand(3, frames, 16, 16) * 2 - 1, str(path), fps=25)


@pytest.fixture(scope="module")
def ucf(tmp_path_factory):
    """UCF-101/<Class>/v_<Class>_g0X_c01.avi (2 groups per class) and ucfTrainTestlist/{classInd,trainlist01,testlist01}.txt."""
    root = tmp_path_factory.mktemp("ucf")
    for name in CLASSES:
        for g in (1, 2):
            clip(root / "UCF-101" / name / f"v_{name}_g0{g}_c01.avi")
    lists = root / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "classInd.txt").write_text("".join(f"{i + 1} {name}\n" for i, name in enumerate(CLASSES)))
    (lists / "trainlist01.txt").write_text("".join(f"{name}/v_{name}_g02_c01.avi {i + 1}\n" for i, name in enumerate(CLASSES)))
    (lists / "testlist01.txt").write_text("".join(f"{name}/v_{name}_g01_c01.avi\n" for name in CLASSES) + "YoYo/v_YoYo_g09_c01.avi\n")
    return root


def read(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_ucf101_to_csv_with_the_official_splits(ucf, capsys):
    out = ucf / "preprocess" / "ucf101_train.csv"
    preprocess.main(["ucf101", "--root", str(ucf / "UCF-101"), "--split", str(ucf / "ucfTrainTestlist" / "trainlist01.txt"), "--output", str(out)])
    rows = read(out)
    assert rows[0] == ["path", "caption", "label"]
    assert rows[1:] == [[str(ucf / "UCF-101" / n / f"v_{n}_g02_c01.avi"), words, str(i)]
                        for i, (n, words) in enumerate(zip(CLASSES, ["Apply Eye Makeup", "Boxing Punching Bag", "Yo Yo"]))]
    preprocess.main(["ucf101", "--root", str(ucf / "UCF-101"), "--split", str(ucf / "ucfTrainTestlist" / "testlist01.txt"), "--output", str(ucf / "test.csv")])
    assert [r[2] for r in read(ucf / "test.csv")[1:]] == ["0", "1", "2"]
    assert f"1 listed files are missing (the first: {ucf / 'UCF-101' / 'YoYo' / 'v_YoYo_g09_c01.avi'})" in capsys.readouterr().out
    preprocess.main(["ucf101", "--root", str(ucf / "UCF-101"), "--output", str(ucf / "UCF-101" / "all.csv")])
    all_rows = read(ucf / "UCF-101" / "all.csv")[1:]
    assert len(all_rows) == 6 and all_rows[5] == ["YoYo/v_YoYo_g02_c01.avi", "Yo Yo", "2"]  # relative: beside the CSV


def test_opendit_layout_and_any_folder(tmp_path):
    for split in ("train", "test"):
        clip(tmp_path / "ucf" / split / "TaiChi" / "a.avi")
    preprocess.main(["ucf101", "--root", str(tmp_path / "ucf"), "--split", "train", "--output", str(tmp_path / "train.csv")])
    assert read(tmp_path / "train.csv")[1:] == [["ucf/train/TaiChi/a.avi", "Tai Chi", "0"]]  # relative to the CSV
    clip(tmp_path / "mine" / "surf_at_dawn.mp4")
    clip(tmp_path / "mine" / "b.mp4")
    (tmp_path / "mine" / "b.txt").write_text("a dog\nrunning  on grass\n")
    preprocess.main(["folder", "--root", str(tmp_path / "mine"), "--output", str(tmp_path / "mine" / "data.csv")])
    assert read(tmp_path / "mine" / "data.csv") == [["path", "caption"], ["b.mp4", "a dog running on grass"], ["surf_at_dawn.mp4", "surf at dawn"]]


def test_preprocess_errors_are_one_line(tmp_path, capsys):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "preprocess.py"), "ucf101", "--root", str(tmp_path / "nope"), "--output", "x.csv"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2 and result.stderr.strip() == f"error: --root {tmp_path / 'nope'}: no such folder"
    for argv, needle in ((["folder", "--root", str(tmp_path), "--output", str(tmp_path / "x.csv")], "no media files"),
                         (["latents", "--data_path", str(tmp_path / "x.csv"), "--output", str(tmp_path / "c"), "--vae", "none"], "no such")):
        with pytest.raises(SystemExit) as info:
            preprocess.main(argv)
        lines = capsys.readouterr().err.strip().splitlines()
        assert info.value.code == 2 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], lines


def test_an_existing_csv_is_kept_unless_overwrite(tmp_path, capsys):
    clip(tmp_path / "mine" / "a.mp4")
    out = tmp_path / "data.csv"
    out.write_text("path,caption\nhand-edited.mp4,keep me\n")
    for argv, needle in ((["--output", str(out)], f"--output {out}: already exists; add --overwrite"),
                         (["--output", str(tmp_path / "mine")], "is a folder"),
                         (["--output", str(tmp_path / "mine" / "a.mp4" / "x.csv")], "is a file, not a folder")):
        with pytest.raises(SystemExit):
            preprocess.main(["folder", "--root", str(tmp_path / "mine")] + argv)
        assert needle in capsys.readouterr().err
    assert out.read_text() == "path,caption\nhand-edited.mp4,keep me\n"
    preprocess.main(["folder", "--root", str(tmp_path / "mine"), "--output", str(out), "--overwrite"])
    assert read(out)[1:] == [["mine/a.mp4", "a"]]
    with pytest.raises(SystemExit):
        preprocess.main(["folder", "--root", str(tmp_path / "mine" / "a.mp4"), "--output", str(tmp_path / "y.csv")])
    assert "is a file; give the folder" in capsys.readouterr().err


def test_a_loose_file_beside_class_folders_is_reported(tmp_path, capsys):
    """One top-level file among class folders drops the labels; the user is told which file did it."""
    clip(tmp_path / "clips" / "Cats" / "a.mp4")
    clip(tmp_path / "clips" / "top.mp4")
    preprocess.main(["folder", "--root", str(tmp_path / "clips"), "--output", str(tmp_path / "d.csv")])
    assert read(tmp_path / "d.csv")[0] == ["path", "caption"]
    assert "1 file(s) lie at the top of" in capsys.readouterr().err and "top.mp4" in read(tmp_path / "d.csv")[2][0]


def test_latents_on_two_ranks_then_train_from_the_cache(ucf, tmp_path):
    data = str(ucf / "UCF-101" / "all.csv")
    if not os.path.exists(data):
        preprocess.main(["ucf101", "--root", str(ucf / "UCF-101"), "--output", data])
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547", os.path.join(ROOT, "preprocess.py"),
           "latents", "--data_path", data, "--use_video", "--num_frames", "3", "--frame_interval", "2", "--image_size", "16", "--vae", "none",
           "--captions", "off", "--num_classes", "3", "--shard_size", "2", "--batch_size", "2", "--num_workers", "0", "--output", str(cache)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "[rank 0] wrote shard-000000" in result.stdout and "[rank 1] wrote shard-000001" in result.stdout
    index = json.loads((cache / "index.json").read_text())
    assert index["count"] == 6 and len(index["shards"]) == 3 and index["latent_shape"] == [3, 3, 16, 16] and index["max_label"] == 2
    ds = LatentDataset(str(cache), train=False)
    assert sorted(int(ds._shard(k).get_tensor("index")[j]) for k in range(3) for j in range(2)) == list(range(6))

    train_cli.main(["--model", "VDiT-S/1x2x2", "--use_video", "--num_frames", "3", "--frame_interval", "2", "--depth", "1", "--hidden_size", "32", "--num_heads", "2",
                    "--image_size", "16", "--vae", "none", "--num_classes", "3", "--batch_size", "2", "--max_steps", "2", "--mixed_precision", "fp32",
                    "--num_workers", "0", "--data_path", str(cache), "--outputs", str(tmp_path / "out")])  # --dataset auto finds the cache
    (run,) = os.listdir(tmp_path / "out")
    assert "Dataset: LatentDataset with 6 items" in (tmp_path / "out" / run / "log.txt").read_text()
    assert json.loads((tmp_path / "out" / run / "config.json").read_text())["args"]["frame_interval"] == 2  # as the cache was made
