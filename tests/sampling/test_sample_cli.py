"""sample.py's user-facing checks: an earlier run's files in --output (refused, or replaced with --overwrite), flag
values refused before anything loads, model flags against the checkpoint's config, short weight-mismatch errors,
help text and messages."""
import os

import pytest
import torch
from tiny import TINY_SAMPLING_ARGS, tiny_checkpoint

from opendit.errors import UsageError
from opendit.sampling import sample as sample_cli

FAST = ["--num_sampling_steps", "2", "--device", "cpu"]
ARGS = TINY_SAMPLING_ARGS


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def error_line(capsys, argv) -> str:
    """Run sample.py; it must exit 2 with one line on stderr, which is returned."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        sample_cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_rerun_into_an_output_folder_is_refused_unless_overwrite(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    sample_cli.main(["--ckpt", ckpt, *FAST, "--labels", "0,1", "--per_class", "2", "--output", str(out)])
    assert "Saved 4 samples" in capsys.readouterr().out
    (out / "notes.txt").write_text("mine")
    (out / "2024-03-01.png").write_bytes(b"mine too")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    err = error_line(capsys, ["--ckpt", ckpt, *FAST, "--labels", "0", "--output", str(out)])
    assert "--output" in err and "--overwrite" in err and "5 files" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing touched
    sample_cli.main(["--ckpt", ckpt, *FAST, "--labels", "3", "--output", str(out), "--overwrite"])
    assert "Saved 1 sample to" in capsys.readouterr().out
    # The earlier run's files are gone (no stale 0001-0003 beside the new grid); the user's files stay.
    assert sorted(os.listdir(out)) == ["0000-class3.png", "2024-03-01.png", "grid.png", "notes.txt"]


@pytest.mark.parametrize("under", [False, True])
def test_output_that_is_a_file_is_refused_before_anything_loads(tmp_path, capsys, under):
    (tmp_path / "f").write_text("x")
    output = tmp_path / "f" / "sub" if under else tmp_path / "f"
    # A missing --ckpt would be the error if the output were checked after loading.
    err = error_line(capsys, ["--ckpt", str(tmp_path / "missing.pt"), "--output", str(output)])
    assert f"--output {output}" in err and "is a file" in err


@pytest.mark.parametrize("flags,words", [
    (["--fps", "-5"], "--fps -5"), (["--fps", "0"], "--fps 0"), (["--fps", "nan"], "--fps nan"),
    (["--cfg_scale", "inf"], "--cfg_scale inf"), (["--cfg_scale", "nan"], "--cfg_scale nan"),
    (["--num_sampling_steps", "2000"], "2 to 1000"), (["--num_sampling_steps", "1"], "--sampler ddpm takes 2 to 1000"), (["--num_sampling_steps", "1001"], "--num_sampling_steps 1001"),
    (["--num_sampling_steps", "333", "--sampler", "ddim"], "250 or 334"), (["--num_sampling_steps", "1000", "--sampler", "dpm-solver"], "1 to 999"),
    (["--batch_size", "0"], "--batch_size 0"),
])
def test_bad_values_are_refused_before_anything_loads(tmp_path, capsys, flags, words):
    err = error_line(capsys, ["--ckpt", str(tmp_path / "missing.pt"), "--output", str(tmp_path / "o"), *flags])
    assert words in err and "missing.pt" not in err


def test_steps_every_sampler_can_space_are_accepted():
    from opendit.diffusion import create_diffusion
    from opendit.sampling.denoise import check_steps
    from opendit.sampling.engine import make_schedule

    for sampler, steps in (("ddpm", 2), ("ddpm", 1000), ("ddim", 2), ("ddim", 334), ("ddim", 1000), ("dpm-solver", 1), ("dpm-solver", 999)):
        check_steps(sampler, steps)
        assert len(set(make_schedule(sampler, steps, "linear", torch.device("cpu")).timesteps.tolist())) == steps, (sampler, steps)
    with pytest.raises(ValueError):  # what the check stands in front of
        create_diffusion("ddim333")


def test_prompt_file_that_is_not_utf8_is_named(ckpt, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_bytes(b"a red circle\n\xff\xfe caf\xe9\n")
    err = error_line(capsys, ["--ckpt", ckpt, *FAST, "--prompt_path", str(tmp_path / "prompts.txt"), "--output", str(tmp_path / "o")])
    assert f"--prompt_path {tmp_path / 'prompts.txt'}" in err and "UTF-8" in err


def test_check_fidelity_refuses_other_labels_before_sampling(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sample_cli, "denoise", lambda *a, **k: pytest.fail("sampled before refusing"))
    err = error_line(capsys, ["--ckpt", ckpt, *FAST, "--labels", "1,9", "--check_fidelity", "--output", str(tmp_path / "o")])
    assert "--check_fidelity" in err and "label 9" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag,value,saved", [("--model", "DiT-B/2", "DiT-S/2"), ("--image_size", "32", "16"), ("--num_classes", "8", "10"),
                                              ("--vae", "ema", "none"), ("--noise_schedule", "squaredcos_cap_v2", "linear")])
def test_model_flags_that_contradict_the_checkpoint_are_refused(ckpt, tmp_path, capsys, flag, value, saved):
    err = error_line(capsys, ["--ckpt", ckpt, *FAST, flag, value, "--output", str(tmp_path / "o")])
    assert f"{flag} {value}" in err and f"trained with {saved}" in err


def test_model_flags_that_agree_with_the_checkpoint_are_accepted(ckpt, tmp_path):
    sample_cli.main(["--ckpt", ckpt, *FAST, "--model", "DiT-S/2", "--image_size", "16", "--num_classes", "10", "--vae", "none", "--labels", "1",
                     "--output", str(tmp_path / "o")])
    args = sample_cli.get_parser().parse_args(["--ckpt", ckpt, "--vae", "mse"])  # another VAE of the same latent space: DiT samples with either
    assert sample_cli.resolve_model_flags(args, {"args": dict(ARGS, vae="ema")}) == [] and args.vae == "mse"


def test_video_num_frames_other_than_trained_is_a_note(tmp_path, capsys):
    config = dict(model="VDiT-S/1x2x2", input_size=8, in_channels=3, num_classes=4, num_frames=3, depth=1, hidden_size=32, num_heads=2)
    ckpt = tiny_checkpoint(tmp_path / "video.pt", config, dict(ARGS, model="VDiT-S/1x2x2", image_size=8, num_classes=4, num_frames=3, use_video=True))
    result = sample_cli.main(["--ckpt", ckpt, *FAST, "--num_frames", "2", "--labels", "1", "--fps", "8", "--output", str(tmp_path / "o")])
    assert "note: --num_frames 2: the checkpoint was trained on 3-frame clips" in capsys.readouterr().out
    from opendit.utils.media import read_video

    assert read_video(result["files"][0]).shape[0] == 2


def test_use_model_is_refused_for_a_single_set_of_weights(ckpt, tmp_path, capsys):
    from safetensors.torch import save_file

    save_file(torch.load(ckpt)["ema"], tmp_path / "w.safetensors")
    plain = tiny_checkpoint(tmp_path / "plain.pt", plain=True)
    for path in (str(tmp_path / "w.safetensors"), plain):
        err = error_line(capsys, ["--ckpt", path, *FAST, "--use_model", "--output", str(tmp_path / "o")])
        assert "single set of weights" in err and "--use_model" in err
    sample_cli.main(["--ckpt", ckpt, *FAST, "--use_model", "--labels", "1", "--output", str(tmp_path / "raw")])  # a .pt with both: fine


def test_weights_that_do_not_fit_give_a_short_error_with_a_hint(tmp_path, capsys):
    plain = tiny_checkpoint(tmp_path / "model.pt", plain=True)
    err = error_line(capsys, ["--ckpt", plain, *FAST, "--vae", "none", "--image_size", "16", "--num_classes", "10", "--output", str(tmp_path / "o")])
    assert "weights do not fit DiT-XL/2" in err and "missing" in err and "of another shape" in err and len(err) < 1000
    assert "export folder or its model.safetensors" in err


def test_gpu_flags_error_names_only_the_flags_given():
    args = sample_cli.get_parser().parse_args(["--ckpt", "x", "--compile"])
    with pytest.raises(UsageError) as e:
        sample_cli.resolve_speed_flags(args, torch.device("cpu"))
    assert str(e.value) == "--compile needs a CUDA GPU"
    args = sample_cli.get_parser().parse_args(["--ckpt", "x", "--cuda_graph", "--mixed_precision", "fp16"])
    with pytest.raises(UsageError, match="^--cuda_graph and --mixed_precision fp16 need a CUDA GPU$"):
        sample_cli.resolve_speed_flags(args, torch.device("cpu"))


def test_only_errors_of_the_split_are_blamed_on_sequence_parallelism(monkeypatch, capsys):
    def elsewhere(args):
        raise ValueError("cannot divide section of 1000 steps into 2000")

    monkeypatch.setattr(sample_cli, "sample", elsewhere)
    with pytest.raises(ValueError, match="cannot divide section"):  # a bug elsewhere stays a bug, not the sp flag's fault
        sample_cli.main(["--ckpt", "x", "--sequence_parallel_size", "2"])

    def split(args):
        from opendit.parallel.mesh import build_mesh

        build_mesh(3, 2, "cpu")

    monkeypatch.setattr(sample_cli, "sample", split)
    with pytest.raises(SystemExit) as e:
        sample_cli.main(["--ckpt", "x", "--sequence_parallel_size", "2"])
    assert e.value.code == 2 and capsys.readouterr().err == "error: --sequence_parallel_size 2: it does not divide the number of processes, 3\n"


def test_help_shows_each_default_once():
    from opendit.sampling import sample_ddp

    parser = sample_cli.get_parser()
    for action in parser._actions:
        assert action.help and parser._get_formatter()._expand_help(action).count("default") <= 1, action.dest
    text = " ".join(parser.format_help().split())
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: 4.0)" in text
    assert "--seed SEED the noise's seed" in text and "--sampler {ddpm,ddim,dpm-solver} ddpm, ddim" in text
    ddp = " ".join(sample_ddp.get_parser().format_help().split())
    assert "(default: 50000)" in ddp and "(default: 32)" in ddp and "--cfg_parallel" not in ddp and "--attention_broadcast" not in ddp
