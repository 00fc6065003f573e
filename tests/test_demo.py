"""The `make demo` pipeline at reduced size: train, sample every class, score with the checker."""
import json
import os

import pytest

from opendit import demo


def test_image_demo_pipeline(tmp_path, capsys):
    demo.main(["--outputs", str(tmp_path), "--max_steps", "3", "--per_class", "1", "--sampling_steps", "2", "--min_fidelity", "0"])
    out = capsys.readouterr().out
    assert "class fidelity:" in out
    (experiment,) = [d for d in os.listdir(tmp_path) if d[0].isdigit()]
    samples = os.path.join(tmp_path, experiment, "samples")
    assert len([f for f in os.listdir(samples) if f.endswith(".png")]) == 8 + 1
    with open(os.path.join(samples, "fidelity.json")) as f:
        assert 0 <= json.load(f)["fidelity"] <= 1


def test_video_demo_pipeline(tmp_path, capsys):
    demo.main(["--video", "--outputs", str(tmp_path), "--max_steps", "2", "--per_class", "1", "--sampling_steps", "2", "--min_fidelity", "0"])
    assert "class fidelity:" in capsys.readouterr().out
    (experiment,) = [d for d in os.listdir(tmp_path) if d[0].isdigit()]
    samples = os.listdir(os.path.join(tmp_path, experiment, "samples"))
    assert len([f for f in samples if f.endswith(".mp4")]) == 8 and "contact_sheet.png" in samples


def test_text_to_video_demo_pipeline(tmp_path, capsys):
    """--text: captions through a tiny offline CLIP; every class x direction is sampled and held to its direction."""
    demo.main(["--video", "--text", "--outputs", str(tmp_path), "--max_steps", "2", "--per_class", "4", "--sampling_steps", "2", "--min_fidelity", "0", "--set", "batch_size=4"])
    assert "class fidelity:" in capsys.readouterr().out
    (experiment,) = [d for d in os.listdir(tmp_path) if d[0].isdigit()]
    samples = os.listdir(os.path.join(tmp_path, experiment, "samples"))
    assert len([f for f in samples if f.endswith(".mp4")]) == 8 * 4
    assert any("moving-left" in f for f in samples) and any("moving-down" in f for f in samples)


def test_prompt_directions():
    from opendit.sampling.conditions import prompt_directions

    assert prompt_directions(["a red circle moving left", "A green square Moving down", "a blue triangle"]) == ["left", "down", None]


def test_demo_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    """--outputs holding someone's experiments is left untouched: one line, nothing removed."""
    (tmp_path / "003-DiT-XL-2").mkdir()
    (tmp_path / "notes.txt").write_text("keep")
    with pytest.raises(SystemExit) as e:
        demo.main(["--outputs", str(tmp_path), "--max_steps", "1"])
    assert "003-DiT-XL-2, notes.txt" in str(e.value) and "--outputs" in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["003-DiT-XL-2", "notes.txt"]


@pytest.mark.parametrize("item, words", [("lrr=2e-3", "train.py's flags"), ("lr", "FLAG=VALUE"), ("lr=abc", "float"), ("mixed_precision=fp8", "choose one of")])
def test_demo_checks_set_before_touching_the_folder(tmp_path, item, words):
    """A mistyped --set is refused in one line before an earlier demo run is removed."""
    earlier = tmp_path / "000-DiT-S-2"
    earlier.mkdir()
    with pytest.raises(SystemExit) as e:
        demo.main(["--outputs", str(tmp_path), "--set", item])
    assert words in str(e.value) and item in str(e.value)
    assert earlier.is_dir()


def test_text_demo_writes_experiment_000(tmp_path):
    """The demo names its run folder itself, so the text encoder's folder does not shift it to 001."""
    (tmp_path / "001-DiT-S-2").mkdir()  # an earlier demo run: replaced
    demo.main(["--text", "--outputs", str(tmp_path), "--max_steps", "1", "--per_class", "1", "--sampling_steps", "2", "--min_fidelity", "0", "--set", "batch_size=4"])
    assert sorted(os.listdir(tmp_path)) == [".demo", "000-DiT-S-2", "text_encoder"]
