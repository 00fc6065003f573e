"""train.py's flag checks: out-of-range numbers and model sizes refused in one line before any folder is written;
the help shows each default once."""
import contextlib
import io
import os

import pytest
import torch
from ranks import TRAIN_FLAGS  # tests/ranks.py (tests/conftest.py puts tests/ on sys.path)

from opendit.builders import build_model
from opendit.errors import UsageError
from opendit.training import train as train_cli
from opendit.training.args import check_flags, check_sequence_parallel_tokens, get_parser


def check(*argv, world_size: int = 1, base=TRAIN_FLAGS):
    args = get_parser().parse_args([*base, *argv])
    check_flags(args, world_size)
    return args


@pytest.mark.parametrize("argv, message", [
    (["--lr", "-1"], "--lr -1: must be at least 0 (0 keeps the weights as they are)"),
    (["--lr", "nan"], "--lr nan: must be a finite number"),
    (["--lr", "inf"], "--lr inf: must be a finite number"),
    (["--weight_decay", "-0.1"], "--weight_decay -0.1: must be at least 0"),
    (["--weight_decay", "inf"], "--weight_decay inf: must be a finite number"),
    (["--ema_decay", "1.5"], "--ema_decay 1.5: must be in [0, 1]"),
    (["--ema_decay", "nan"], "--ema_decay nan: must be a finite number"),
    (["--grad_clip", "nan"], "--grad_clip nan: must be a finite number (<= 0 disables clipping)"),
    (["--grad_clip", "inf"], "--grad_clip inf: must be a finite number (<= 0 disables clipping)"),
    (["--snr_gamma", "inf"], "--snr_gamma inf: must be a finite number"),
    (["--peak_tflops", "0"], "--peak_tflops 0: must be positive"),
    (["--num_workers", "-1"], "--num_workers -1: must be at least 0"),
    (["--sample_every", "-2"], "--sample_every -2: must be at least 0"),
    (["--depth", "0"], "--depth 0: must be at least 1"),
    (["--hidden_size", "-4"], "--hidden_size -4: must be at least 1"),
    (["--num_heads", "0"], "--num_heads 0: must be at least 1"),
    (["--num_heads", "3"], "--num_heads 3: the hidden size 32 (--hidden_size) does not divide by it"),
])
def test_bad_numbers_are_one_line_errors(argv, message):
    with pytest.raises(UsageError) as error:
        check(*argv)
    assert str(error.value) == message


def test_good_numbers_pass():
    args = check("--lr", "1e30", "--grad_clip", "0", "--weight_decay", "0", "--ema_decay", "1", "--num_workers", "0", "--peak_tflops", "5")
    assert args.lr == 1e30 and args.grad_clip == 0
    assert check("--lr", "0").lr == 0  # frozen weights (with --ema_decay 1, a frozen EMA): what loading tests use
    with pytest.raises(UsageError, match=r"^--num_heads 5: the hidden size 384 \(--hidden_size\) does not divide by it$"):
        check("--num_heads", "5", base=["--model", "DiT-S/2", "--vae", "none", "--image_size", "32"])  # DiT-S's own hidden size


def test_heads_must_divide_by_the_sequence_parallel_size():
    three_heads = ["--hidden_size", "48", "--num_heads", "3", "--sequence_parallel_size", "2"]
    with pytest.raises(UsageError, match=r"^--sequence_parallel_size 2: the model's 3 attention heads \(--num_heads\) do not divide by it$"):
        check(*three_heads, world_size=2)
    latte = ["--model", "Latte-S/1x2x2", "--use_video", "--num_frames", "4"]
    check(*three_heads, *latte, world_size=2)  # DSP (Latte's default) splits frames and positions, never heads
    with pytest.raises(UsageError, match="3 attention heads"):
        check(*three_heads, *latte, "--sequence_parallel_type", "ulysses", world_size=2)


def test_tokens_must_divide_by_the_sequence_parallel_size():
    args = check("--sequence_parallel_size", "2", world_size=2)
    model = build_model(dict(model="DiT-S/2", input_size=6, in_channels=3, num_classes=0, depth=1, hidden_size=32, num_heads=2))
    with pytest.raises(UsageError, match=r"^--sequence_parallel_size 2: the model's 9 tokens per image \(--image_size\) do not divide by it$"):
        check_sequence_parallel_tokens(args, model)
    latte = build_model(dict(model="Latte-S/1x2x2", input_size=8, in_channels=3, num_classes=0, num_frames=3, depth=2, hidden_size=32, num_heads=2))
    with pytest.raises(UsageError, match=r"the model's 3 token frames \(--num_frames\) do not divide"):
        check_sequence_parallel_tokens(args, latte)
    check_sequence_parallel_tokens(args, build_model(dict(model="DiT-S/2", input_size=8, in_channels=3, num_classes=0, depth=1, hidden_size=32, num_heads=2)))


def _refused_rank(rank, world_size, argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as status:
        train_cli.main(argv)
    assert status.value.code == 2 and err.getvalue().strip().splitlines() == ["error: --sequence_parallel_size 2: the model's 3 attention heads (--num_heads) do not divide by it"], err.getvalue()


def test_heads_refused_on_every_rank_under_torchrun(dt, tmp_path):
    dt.run(_refused_rank, 2, [*TRAIN_FLAGS, "--hidden_size", "48", "--num_heads", "3", "--sequence_parallel_size", "2", "--outputs", str(tmp_path)])
    assert not os.listdir(tmp_path)


def test_refused_before_the_experiment_folder(tmp_path, capsys):
    for argv in (["--lr", "-1"], ["--lr", "nan"], ["--num_heads", "0"], ["--ema_decay", "2"], ["--grad_clip", "nan"]):
        with pytest.raises(SystemExit) as status:
            train_cli.main([*TRAIN_FLAGS, *argv, "--outputs", str(tmp_path)])
        err = capsys.readouterr().err.strip().splitlines()
        assert status.value.code == 2 and len(err) == 1 and err[0].startswith(f"error: {argv[0]} "), err
    assert not os.listdir(tmp_path)  # no junk outputs/NNN-* folder


def test_device_cuda_without_a_gpu_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as status:
        train_cli.main([*TRAIN_FLAGS, "--device", "cuda", "--outputs", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status.value.code == 2 and err == ["error: --device cuda: no CUDA GPU is available here (use --device cpu or auto)"]
    assert not os.listdir(tmp_path)


def test_help_shows_each_default_once():
    text = " ".join(get_parser().format_help().split())
    assert "(default: None)" not in text and "(default: )" not in text and "(default: False)" not in text
    assert text.count("(default") == text.count("(default:")  # one spelling
    assert "per data-parallel rank (default: 2)" in text and "stop after this many optimizer steps (default: run all epochs)" in text
    assert "train a video model (VDiT, Latte, vDiT) on clips" in text and "global_seed * dp_size + dp_rank" in text
    helps = {action.dest: action.help for action in get_parser()._actions}
    assert all(helps[flag] for flag in ("epochs", "ema_decay", "weight_decay", "device"))
