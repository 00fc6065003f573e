"""OpenDiT checkpoint folders (epochE-global_stepG/ with model/ shards, ema.pt, optimizer/, running_states.json):
sample.py --ckpt and train.py --load (weights only) read them."""
import json
import os

import pytest
import torch

from opendit.checkpoint.weights import load_model_weights, load_opendit_folder
from opendit.errors import CheckpointError
from opendit.models import DiT_models

MODEL = dict(input_size=8, in_channels=3, num_classes=8, depth=1, hidden_size=32, num_heads=2)


def random_model(seed, **size):
    torch.manual_seed(seed)
    model = DiT_models["DiT-S/2"](**{**MODEL, **size})
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    return model


def write_opendit(root, model_state, ema_state, shards=2, fmt="bin", prefix="", dtype=torch.bfloat16):
    """The layout of OpenDiT's ckpt_utils.save: ColossalAI's sharded model/ (index + shards, working dtype), ema.pt, optimizer/, running_states.json."""
    step = root / "000-DiT-S-2" / "epoch0-global_step4"
    (step / "model").mkdir(parents=True)
    (step / "optimizer").mkdir()
    keys = list(model_state)
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}.bin" if fmt == "bin" else f"model-{i + 1:05d}.safetensors"
        part = {prefix + k: model_state[k].to(dtype).contiguous() for k in keys[i::shards]}
        if fmt == "bin":
            torch.save(part, step / "model" / name)
        else:
            from safetensors.torch import save_file

            save_file(part, str(step / "model" / name))
        weight_map.update({k: name for k in part})
    index = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
    (step / "model" / index).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    torch.save(ema_state, step / "ema.pt")
    torch.save({"state": {}}, step / "optimizer" / "pytorch_optim-00001.bin")
    (step / "running_states.json").write_text(json.dumps({"epoch": 0, "step": 4, "global_step": 4, "sample_start_index": 8}))
    return step


@pytest.mark.parametrize("fmt,prefix", [("bin", ""), ("safetensors", "module.")])
def test_reads_model_shards_and_ema(tmp_path, fmt, prefix):
    model, ema = random_model(0).state_dict(), random_model(1).state_dict()
    step = write_opendit(tmp_path, model, ema, fmt=fmt, prefix=prefix)
    for path in (step, step.parent):  # a step folder, or the experiment folder (its newest step)
        got_ema, config = load_model_weights(str(path))
        assert config is None and set(got_ema) == set(ema) and all(torch.equal(got_ema[k], ema[k]) for k in ema)
        got_model, _ = load_model_weights(str(path), use_ema=False)
        assert all(got_model[k].dtype == torch.float32 and torch.equal(got_model[k], model[k].to(torch.bfloat16).float()) for k in model)
    got_dir = load_opendit_folder(str(step / "model"))  # OpenDiT's sample.py also took the model/ folder itself
    assert set(got_dir) == set(model)


def test_a_step_without_ema_says_it_samples_the_model(tmp_path, capsys):
    model = random_model(0).state_dict()
    step = write_opendit(tmp_path, model, random_model(1).state_dict())
    os.remove(step / "ema.pt")
    got, _ = load_model_weights(str(step))
    assert all(torch.equal(got[k], model[k].to(torch.bfloat16).float()) for k in model)
    assert capsys.readouterr().err.strip() == f"note: {step} has no ema.pt; using the model weights of model/"


def test_newest_step_and_missing_shard(tmp_path):
    step = write_opendit(tmp_path, random_model(0).state_dict(), random_model(1).state_dict())
    later = step.parent / "epoch1-global_step12"
    os.rename(step, later)
    write_opendit(tmp_path, random_model(2).state_dict(), random_model(2).state_dict())  # epoch0-global_step4 again
    ema, _ = load_model_weights(str(step.parent))
    assert torch.equal(ema["x_embedder.proj.weight"], random_model(1).state_dict()["x_embedder.proj.weight"])  # step 12's
    os.remove(later / "model" / "pytorch_model-00002.bin")
    with pytest.raises(CheckpointError, match="pytorch_model-00002.bin"):
        load_model_weights(str(later), use_ema=False)


def test_sample_and_train_from_an_opendit_folder(tmp_path, capsys):
    from opendit.sampling import sample as sample_cli
    from opendit.training import train as train_cli

    registry = dict(input_size=16, depth=12, hidden_size=384, num_heads=6)  # DiT-S/2 as registered: sample.py has no size overrides
    model, ema = random_model(0, **registry).state_dict(), random_model(1, **registry).state_dict()
    step = write_opendit(tmp_path, model, ema, dtype=torch.float32)
    flags = ["--model", "DiT-S/2", "--image_size", "16", "--vae", "none", "--num_classes", "8"]
    sample_cli.main(["--ckpt", str(step), *flags, "--num_sampling_steps", "2", "--labels", "1", "--output", str(tmp_path / "s")])
    assert sorted(os.listdir(tmp_path / "s")) == ["0000-class1.png", "grid.png"]

    out = tmp_path / "runs"
    train_cli.main([*flags, "--dataset", "shapes", "--dataset_size", "8", "--batch_size", "4", "--mixed_precision", "fp32", "--num_workers", "0",
                    "--max_steps", "1", "--lr", "0", "--ema_decay", "1", "--load", str(step), "--outputs", str(out)])
    experiment = out / os.listdir(out)[0]
    log = (experiment / "log.txt").read_text()
    assert "an OpenDiT checkpoint: weights only" in log and "step is not" not in log
    from opendit.checkpoint.dcp import read_tensors, read_train_state

    saved = experiment / "checkpoints" / "step-0000001"
    assert read_train_state(str(saved))["step"] == 1  # started at step 0
    got_model, got_ema = read_tensors(str(saved), "model"), read_tensors(str(saved), "ema")
    assert all(torch.equal(got_model[k], model[k]) for k in model)  # lr 0: the loaded weights, unchanged
    assert all(torch.equal(got_ema[k], ema[k]) for k in ema)  # decay 1: ema.pt's weights, unchanged


def test_opendit_weights_that_do_not_fit_are_one_line(tmp_path, capsys):
    from opendit.training import train as train_cli

    step = write_opendit(tmp_path, random_model(0).state_dict(), random_model(1).state_dict())
    with pytest.raises(SystemExit) as e:
        train_cli.main(["--model", "DiT-S/2", "--depth", "2", "--hidden_size", "32", "--num_heads", "2", "--image_size", "16", "--vae", "none",
                        "--num_classes", "8", "--dataset", "shapes", "--dataset_size", "8", "--batch_size", "4", "--mixed_precision", "fp32",
                        "--num_workers", "0", "--max_steps", "1", "--load", str(step), "--outputs", str(tmp_path / "o")])
    assert e.value.code == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert "OpenDiT model weights do not fit" in line and "blocks.1" in line
