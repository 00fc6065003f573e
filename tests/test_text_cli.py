"""Text-conditioned sampling through sample.py's CLI: prompts -> PNG / mp4 files, CFG against the null prompt, errors.

Everything is tiny and offline: a random CLIP text model written by tiny_text_encoder, pixel-space (--vae none).
"""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from opendit.sampling import sample as sample_cli
from opendit.training import train as train_cli
from opendit.builders import build_model
from opendit.encoders import tiny_text_encoder

TEXT_DIM = 16


pytestmark = pytest.mark.usefixtures("no_network")  # nothing may download (tests/conftest.py)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return tiny_text_encoder(str(tmp_path_factory.mktemp("clip") / "tiny"), hidden_size=TEXT_DIM)


def text_checkpoint(path, clip, video=False, num_classes=0, text_dim=TEXT_DIM) -> str:
    """A .pt in this project's format ({"ema", "config"}) holding a random tiny text-conditioned DiT / VDiT."""
    model = "VDiT-S/1x2x2" if video else "DiT-S/2"
    config = dict(model=model, input_size=16, in_channels=3, num_classes=num_classes, depth=1, hidden_size=32, num_heads=2, text_dim=text_dim)
    if video:
        config["num_frames"] = 3
    torch.manual_seed(0)
    net = build_model(config)
    for p in net.parameters():
        p.data.normal_(0, 0.05)
    args = dict(model=model, vae="none", image_size=16, num_classes=num_classes, num_frames=3, use_video=video, text_encoder=clip, noise_schedule="linear")
    torch.save({"ema": net.state_dict(), "config": {"model": config, "args": args}}, path)
    return str(path)


@pytest.fixture(scope="module")
def image_ckpt(clip, tmp_path_factory):
    return text_checkpoint(tmp_path_factory.mktemp("ckpt") / "text.pt", clip)


def run(*argv):
    return sample_cli.main(["--num_sampling_steps", "2", "--sampler", "ddim", *argv])


def pixels(path):
    return np.array(Image.open(path)).astype(np.int16)


def test_prompts_give_one_png_each_named_after_the_prompt(image_ckpt, tmp_path):
    (tmp_path / "prompts.txt").write_text("a blue square\n\n  a green cross, moving!  \n")
    result = run("--ckpt", image_ckpt, "--prompt", "a red circle", "--prompt_path", str(tmp_path / "prompts.txt"), "--output", str(tmp_path / "out"))
    assert result["prompts"] == ["a red circle", "a blue square", "a green cross, moving!"]
    assert sorted(os.listdir(tmp_path / "out")) == ["0000-prompt0-a-red-circle.png", "0001-prompt1-a-blue-square.png", "0002-prompt2-a-green-cross-moving.png", "grid.png"]
    assert pixels(tmp_path / "out" / "0000-prompt0-a-red-circle.png").shape == (16, 16, 3)
    again = run("--ckpt", image_ckpt, "--prompt", "a red circle", "--output", str(tmp_path / "again"))  # the text encoder comes from the checkpoint
    assert np.array_equal(pixels(tmp_path / "again" / "0000-prompt0-a-red-circle.png"), pixels(tmp_path / "out" / "0000-prompt0-a-red-circle.png"))


def test_prompt_changes_the_sample_and_guidance_scale_matters(image_ckpt, tmp_path):
    def one(prompt, scale):
        out = tmp_path / f"{prompt}-{scale}"
        run("--ckpt", image_ckpt, "--prompt", prompt, "--cfg_scale", str(scale), "--output", str(out))
        return pixels(next(p for p in out.iterdir() if p.name.startswith("0000")))

    base = one("a red circle", 4.0)
    assert np.abs(base - one("a blue square", 4.0)).max() > 0
    assert np.abs(base - one("a red circle", 1.0)).max() > 0  # the null-prompt branch is real: guidance changes samples


def test_text_model_with_labels_samples_every_prompt_and_label(clip, tmp_path):
    ckpt = text_checkpoint(tmp_path / "both.pt", clip, num_classes=4)
    result = run("--ckpt", ckpt, "--prompt", "a red circle", "--labels", "1,3", "--per_class", "2", "--output", str(tmp_path / "out"))
    assert result["labels"] == [1, 1, 3, 3]
    assert sorted(os.listdir(tmp_path / "out"))[:2] == ["0000-prompt0-class1-a-red-circle.png", "0001-prompt0-class1-a-red-circle.png"]
    # Without --labels the class is the null class (what the label dropout trained), and file names omit it.
    result = run("--ckpt", ckpt, "--prompt", "x", "--output", str(tmp_path / "null"))
    assert result["labels"] == [4] and os.listdir(tmp_path / "null") != [] and "0000-prompt0-x.png" in os.listdir(tmp_path / "null")


def test_check_fidelity_reads_the_class_from_the_prompt(image_ckpt, tmp_path, capsys):
    result = run("--ckpt", image_ckpt, "--prompt", "a Red Circle", "--prompt", "a green cross", "--check_fidelity", "--output", str(tmp_path / "out"))
    assert 0.0 <= result["fidelity"] <= 1.0 and os.path.exists(tmp_path / "out" / "fidelity.json")
    one_line_error(capsys, "--ckpt", image_ckpt, "--prompt", "a cat", "--check_fidelity", needles=["--check_fidelity", "'a cat'"])


def test_video_text_model_writes_mp4_per_prompt(clip, tmp_path):
    ckpt = text_checkpoint(tmp_path / "video.pt", clip, video=True)
    result = run("--ckpt", ckpt, "--prompt", "Biking", "--prompt", "Tai Chi", "--output", str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path / "out")) == ["0000-prompt0-biking.mp4", "0001-prompt1-tai-chi.mp4"]
    from opendit.utils.media import read_video

    assert read_video(result["files"][1]).shape == (3, 16, 16, 3)


def one_line_error(capsys, *argv, needles=(), tmp_output="/nonexistent/samples"):
    """The run must stop in one line before writing anything; its --output, unless given, is not the checkout's samples/
    (whose earlier files would be refused first)."""
    capsys.readouterr()  # drop earlier output
    with pytest.raises(SystemExit) as e:
        run(*argv, *([] if "--output" in argv else ["--output", str(tmp_output)]))
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_text_flag_mistakes_are_one_line_errors(image_ckpt, clip, tmp_path, capsys):
    one_line_error(capsys, "--ckpt", image_ckpt, needles=["--prompt"])
    one_line_error(capsys, "--ckpt", image_ckpt, "--prompt_path", str(tmp_path / "none.txt"), needles=["--prompt_path", "none.txt"])
    one_line_error(capsys, "--ckpt", image_ckpt, "--prompt", "a", "--text_encoder", str(tmp_path / "nope"), needles=["--text_encoder", "nope"])
    one_line_error(capsys, "--ckpt", image_ckpt, "--prompt", "a", "--labels", "1", needles=["--labels", "no class labels"])
    wide = text_checkpoint(tmp_path / "wide.pt", clip, text_dim=TEXT_DIM * 2)
    one_line_error(capsys, "--ckpt", wide, "--prompt", "a", needles=["--text_encoder", "32-d"])
    from opendit.models import DiT_models

    torch.save(DiT_models["DiT-S/8"](input_size=8, num_classes=10).state_dict(), tmp_path / "class.pt")
    class_model = ["--ckpt", str(tmp_path / "class.pt"), "--model", "DiT-S/8", "--image_size", "8", "--vae", "none", "--num_classes", "10"]
    one_line_error(capsys, *class_model, "--prompt", "a red circle", needles=["--prompt", "not text-conditioned"])
    one_line_error(capsys, *class_model, "--text_encoder", clip, needles=["--text_encoder", "not text-conditioned"])


MODELS = {
    "image": ["--model", "DiT-S/2"],
    "video": ["--model", "VDiT-S/1x2x2", "--use_video", "--num_frames", "3"],
    # Latte with the speed-ups the CPU runs: the fused-kernel switch (PyTorch fallback on the CPU) and checkpointing
    "latte": ["--model", "Latte-S/1x2x2", "--use_video", "--num_frames", "2", "--depth", "2", "--enable_modulate_kernel", "--grad_checkpoint"],
}


@pytest.mark.parametrize("video", list(MODELS))
def test_train_on_captions_then_sample_prompts(clip, tmp_path, video):
    """train.py on captioned shapes builds a text model (text_dim from the encoder); sample.py reuses its encoder."""
    model = MODELS[video]
    train_cli.main(["--depth", "1", *model, "--hidden_size", "32", "--num_heads", "2", "--image_size", "16", "--vae", "none", "--num_classes", "8",
                    "--dataset", "shapes", "--captions", "on", "--text_encoder", clip, "--dataset_size", "8", "--batch_size", "2", "--max_steps", "2",
                    "--mixed_precision", "fp32", "--num_workers", "0", "--outputs", str(tmp_path / "o")])
    (experiment,) = [os.path.join(tmp_path / "o", d) for d in os.listdir(tmp_path / "o")]
    with open(os.path.join(experiment, "config.json")) as f:
        config = json.load(f)
    assert config["model"]["text_dim"] == TEXT_DIM and config["args"]["text_encoder"] == clip
    result = run("--ckpt", experiment, "--prompt", "a red circle", "--prompt", "a blue square", "--output", str(tmp_path / "s"))
    suffix = ".png" if video == "image" else ".mp4"
    expected = [f"0000-prompt0-a-red-circle{suffix}", f"0001-prompt1-a-blue-square{suffix}"] + (["grid.png"] if video == "image" else [])
    assert sorted(os.listdir(tmp_path / "s")) == expected and result["labels"] == [8, 8]  # the null class: prompts alone


def test_shipped_demo_clips_train_and_sample_text_to_video(clip, tmp_path):
    """videos/demo.csv (shipped clips with captions) -> train.py --use_video -> sample.py --prompt -> mp4 files."""
    demo = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "videos", "demo.csv")
    train_cli.main(["--model", "VDiT-S/1x2x2", "--use_video", "--num_frames", "4", "--frame_interval", "2", "--depth", "1", "--hidden_size", "32",
                    "--num_heads", "2", "--image_size", "16", "--vae", "none", "--num_classes", "8", "--data_path", demo, "--text_encoder", clip,
                    "--batch_size", "2", "--max_steps", "2", "--mixed_precision", "fp32", "--num_workers", "0", "--outputs", str(tmp_path / "o")])
    (experiment,) = [os.path.join(tmp_path / "o", d) for d in os.listdir(tmp_path / "o")]
    log = open(os.path.join(experiment, "log.txt")).read()
    assert "with 5 items" in log and "Skipped" not in log  # every shipped clip decodes
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving up\n\na green cross moving down\n")
    run("--ckpt", experiment, "--prompt_path", str(prompts), "--labels", "0", "--output", str(tmp_path / "s"))
    files = sorted(os.listdir(tmp_path / "s"))
    assert len(files) == 2 and all(f.endswith(".mp4") and os.path.getsize(tmp_path / "s" / f) > 0 for f in files), files
