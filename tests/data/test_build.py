"""build_dataset's choice of dataset, train.py through its CLI on real data (image folder, video CSV), and every bad
input as a one-line error before training or a skip counted in the log."""

import json
import os
from types import SimpleNamespace

import pytest

from opendit.training import train as train_cli
from opendit.data.build import build_dataset, infer_kind
from opendit.errors import UsageError

TINY = ["--model", "DiT-S/2", "--depth", "1", "--hidden_size", "32", "--num_heads", "2", "--image_size", "16", "--vae", "none",
        "--batch_size", "2", "--max_steps", "2", "--mixed_precision", "fp32", "--num_workers", "0", "--log_every", "1"]
VIDEO = ["--model", "VDiT-S/1x2x2", "--use_video", "--num_frames", "3", "--frame_interval", "2", *TINY[2:]]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    from PIL import Image

    for c, colour in enumerate([(200, 30, 30), (30, 200, 30)]):
        (root / f"n0{c}").mkdir()
        for k in range(3):
            Image.new("RGB", (24 + 4 * k, 20), colour).save(root / f"n0{c}" / f"{k}.jpg")
    return str(root)


def experiment(outputs):
    (name,) = os.listdir(outputs)
    return os.path.join(outputs, name)


def run_error(capsys, *argv):
    """train.py's exit code and its stderr lines, for a run that must stop with a one-line error."""
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(list(argv))
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_auto_infers_the_dataset(tmp_path, folder, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./datasets here: the default --data_path means the built-in shapes
    def kind(path, **flags):
        return infer_kind(SimpleNamespace(data_path=str(path), dataset="auto", **flags))

    (tmp_path / "d.csv").write_text("a.mp4,x\n")
    (tmp_path / "cifar" / "cifar-10-batches-py").mkdir(parents=True)
    (tmp_path / "cifar" / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "index.json").write_text("{}")
    assert kind("./datasets") == "shapes" and kind(tmp_path / "d.csv") == "csv" and kind(folder) == "folder"
    with pytest.raises(UsageError, match="missing: no such file or folder .*--dataset shapes"):  # an explicit, mistyped path
        kind(tmp_path / "missing")
    assert kind(tmp_path / "cifar") == "cifar10" and kind(tmp_path / "cache") == "latents"
    shapes = build_dataset(SimpleNamespace(data_path="./datasets", dataset="auto", use_video=False, image_size=16, num_classes=8,
                                           dataset_size=4, captions="on"))
    assert shapes[0]["text"] == "a red circle" and shapes.has_text


def test_train_from_an_image_folder(tmp_path, folder):
    train_cli.main([*TINY, "--num_classes", "2", "--data_path", folder, "--outputs", str(tmp_path)])
    run = experiment(tmp_path)
    with open(os.path.join(run, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]
    assert "Dataset: ImageFolderDataset with 6 items" in open(os.path.join(run, "log.txt")).read()


def test_train_from_a_video_csv_with_captions_skipping_a_bad_file(tmp_path, media, clip_dir):
    media.video(tmp_path / "a.mp4", 12, 40, 32, 24)
    media.video(tmp_path / "b.webm", 7, 34, 48, 30, "libvpx")  # portrait
    media.video(tmp_path / "c.mp4", 2, 32, 32, 10)  # shorter than the clip: looped
    (tmp_path / "garbage.mp4").write_bytes(b"\x00not a video" * 100)
    (tmp_path / "clips.csv").write_text("a.mp4,a clip\nb.webm,a portrait clip\ngarbage.mp4,broken\nc.mp4,a short clip\n")
    train_cli.main([*VIDEO, "--num_classes", "1", "--data_path", str(tmp_path / "clips.csv"), "--text_encoder", clip_dir,
                    "--batch_size", "4", "--outputs", str(tmp_path / "out")])
    run = experiment(tmp_path / "out")
    log = open(os.path.join(run, "log.txt")).read()
    assert "Skipped bad sample #1 (item 2" in log and "garbage.mp4" in log  # replaced: batches of 4 from 4 rows
    with open(os.path.join(run, "config.json")) as f:
        model = json.load(f)["model"]
    assert model["text_dim"] == 16  # trained on the captions through the tiny CLIP
    assert model["num_classes"] == 0  # no label column: no class table (it would get no gradient, which DDP refuses)


def test_bad_inputs_stop_before_training_in_one_line(tmp_path, folder, capsys, media):
    out = ["--outputs", str(tmp_path / "out")]
    (tmp_path / "nocaption.csv").write_text("path,label\na.png,1\n")
    assert "nocaption.csv row 1: the header path,label has no caption column" in run_error(capsys, *TINY, "--data_path", str(tmp_path / "nocaption.csv"), *out)
    (tmp_path / "missing.csv").write_text("gone.mp4,x\nalso_gone.mp4,y\n")
    assert "none of its 2 files exist" in run_error(capsys, *VIDEO, "--data_path", str(tmp_path / "missing.csv"), *out)
    (tmp_path / "junk.mp4").write_bytes(b"junk" * 100)
    (tmp_path / "junk.csv").write_text("junk.mp4,x\n")
    assert "none of the first 1 existing files could be read" in run_error(capsys, *VIDEO, "--data_path", str(tmp_path / "junk.csv"), *out)
    (tmp_path / "empty").mkdir()
    assert "no class sub-folders" in run_error(capsys, *TINY, "--data_path", str(tmp_path / "empty"), *out)
    assert "2 classes, more than --num_classes 1" in run_error(capsys, *TINY, "--num_classes", "1", "--data_path", folder, *out)
    media.image(tmp_path / "img.png", 16, 16)
    (tmp_path / "labels.csv").write_text("img.png,an image,0\nimg.png,another,5\n")
    assert "labels.csv row 2: label 5 is outside [0, --num_classes 3)" in run_error(capsys, *TINY, "--num_classes", "3", "--data_path", str(tmp_path / "labels.csv"), *out)
    assert "--use_video trains on clips listed in a CSV" in run_error(capsys, *VIDEO, "--data_path", folder, *out)
    assert "--captions on" in run_error(capsys, *TINY, "--captions", "on", "--data_path", folder, *out)
    assert f"--data_path {folder}: a folder; --dataset csv needs a .csv file" in run_error(capsys, *TINY, "--dataset", "csv", "--data_path", folder, *out)
    assert not os.path.exists(tmp_path / "out")  # nothing was started


def test_shapes_notes_an_unread_data_path(folder, capsys):
    flags = dict(data_path=folder, dataset="shapes", use_video=False, image_size=16, num_classes=8, dataset_size=4)
    build_dataset(SimpleNamespace(**flags))
    assert capsys.readouterr().err.strip() == f"note: --dataset shapes: the built-in data; --data_path {folder} is not read"


def test_on_bad_sample_error_stops_in_one_line(tmp_path, media, capsys):
    good = media.video(tmp_path / "good.mp4", 8, 32, 32)
    (tmp_path / "bad.mp4").write_bytes(b"junk" * 100)
    (tmp_path / "clips.csv").write_text(f"{good},ok\nbad.mp4,broken\n")
    line = run_error(capsys, *VIDEO, "--num_classes", "1", "--captions", "off", "--on_bad_sample", "error", "--data_path",
                     str(tmp_path / "clips.csv"), "--outputs", str(tmp_path / "out"))
    assert line.startswith("error: bad sample (--on_bad_sample error): ") and "bad.mp4" in line


def test_demo_clips_are_reproducible_and_readable(tmp_path):
    from opendit.data.make_demo_videos import make_demo_videos
    from opendit.data.video import VideoCSVDataset

    shipped = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "videos", "demo.csv")
    make_demo_videos(str(tmp_path))
    assert (tmp_path / "demo.csv").read_text() == open(shipped).read()
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    make_demo_videos(str(tmp_path))  # again: nothing changes, byte for byte
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before
    ds = VideoCSVDataset(shipped, image_size=32, num_frames=16, frame_interval=3, train=False, num_classes=8)
    assert [tuple(ds[i]["x"].shape) for i in range(len(ds))] == [(3, 16, 32, 32)] * 5
    assert ds[0]["text"] == "a red circle moving up" and ds[0]["y"] == 0


def test_text_to_image_from_a_captioned_image_csv(tmp_path, folder, clip_dir):
    """A CSV of images and captions trains a text-conditioned DiT; sample.py then draws PNGs from prompts."""
    from opendit.sampling import sample as sample_cli

    rows = [f"{os.path.join(folder, c, f'{k}.jpg')},a {colour} picture" for c, colour in (("n00", "red"), ("n01", "green")) for k in range(3)]
    (tmp_path / "captions.csv").write_text("path,caption\n" + "\n".join(rows) + "\n")
    train_cli.main([*TINY, "--num_classes", "2", "--data_path", str(tmp_path / "captions.csv"), "--text_encoder", clip_dir, "--outputs", str(tmp_path / "out")])
    run = experiment(tmp_path / "out")
    with open(os.path.join(run, "config.json")) as f:
        model = json.load(f)["model"]
    assert model["text_dim"] == 16 and model["num_classes"] == 0  # captions, no label column
    result = sample_cli.main(["--ckpt", run, "--prompt", "a red picture", "--num_sampling_steps", "2", "--output", str(tmp_path / "s")])
    assert [os.path.basename(f) for f in result["files"]] == ["0000-prompt0-a-red-picture.png", "grid.png"]
