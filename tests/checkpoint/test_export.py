"""A 2-rank zero2 run's sharded EMA -> opendit.export -> sample.py gives the in-memory EMA's weights and samples;
sample_ddp.py spreads distinct samples over the ranks, writes the ADM .npz and resumes."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from opendit.builders import build_model
from opendit.checkpoint import export
from opendit.checkpoint.dcp import save_checkpoint
from opendit.parallel.mesh import build_mesh
from opendit.parallel.parallelize import parallelize
from opendit.sampling import sample, sample_ddp
from opendit.training.ema import ShardedEMA
from opendit.training.optim import ShardedAdamW

# A pixel-space model of train.py's geometry (16 px, patch 2, 3 channels), so sample.py can decode without a VAE.
CONFIG = dict(model="DiT-S/2", input_size=16, in_channels=3, num_classes=8, depth=2, hidden_size=32, num_heads=2)
ARGS = dict(model="DiT-S/2", vae="none", image_size=16, num_classes=8, noise_schedule="linear")


def train_and_save(rank, world_size, folder):
    torch.distributed.init_process_group("gloo")
    torch.manual_seed(0)
    model = build_model(CONFIG)
    parallelize(model, mesh=build_mesh(world_size, 1, "cpu"), plugin="zero2")
    opt = ShardedAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, foreach=True)
    ema = ShardedEMA(model)
    g = torch.Generator().manual_seed(rank)
    for _ in range(3):
        x, t, y = torch.randn(2, 3, 16, 16, generator=g), torch.randint(0, 1000, (2,), generator=g), torch.randint(0, 8, (2,), generator=g)
        opt.zero_grad()
        model(x, t, y).square().mean().backward()
        opt.step()
        ema.update(0.5)
    save_checkpoint(os.path.join(folder, "checkpoints"), 3, model, opt, ema, {"step": 3, "config": {"model": CONFIG, "args": ARGS}})
    in_memory = {name: t.full_tensor() if hasattr(t, "full_tensor") else t for name, t in ema.state_dict().items()}
    if rank == 0:
        torch.save(in_memory, os.path.join(folder, "in_memory_ema.pt"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dt):
    folder = str(tmp_path_factory.mktemp("run"))
    dt.run(train_and_save, 2, folder)
    return folder


def pngs(folder):
    return {name: np.asarray(Image.open(os.path.join(folder, name))) for name in sorted(os.listdir(folder)) if name.endswith(".png")}


def test_export_then_sample_matches_in_memory_ema(trained, tmp_path):
    in_memory = torch.load(os.path.join(trained, "in_memory_ema.pt"), weights_only=True)
    paths = export.main([trained, "--output", str(tmp_path / "export")])
    exported = load_file(paths["safetensors"])
    assert exported.keys() == in_memory.keys() and all(torch.equal(exported[k], in_memory[k]) for k in in_memory)
    official = torch.load(paths["pt"], weights_only=True)  # a plain state dict, as Meta's DiT-XL-2-256x256.pt
    assert all(torch.equal(official[k], in_memory[k]) for k in in_memory)
    with open(paths["config"]) as f:
        assert json.load(f)["model"] == CONFIG

    flags = ["--num_sampling_steps", "3", "--labels", "0,3", "--sampler", "ddim", "--cfg_scale", "2"]
    sample.main(["--ckpt", str(tmp_path / "export")] + flags + ["--output", str(tmp_path / "a")])
    sample.main(["--ckpt", paths["safetensors"]] + flags + ["--output", str(tmp_path / "b")])
    sample.main(["--ckpt", trained] + flags + ["--output", str(tmp_path / "c")])  # the DCP checkpoint itself
    # The in-memory EMA, handed to sample.py as a plain {"ema", "config"} .pt:
    torch.save({"ema": in_memory, "config": {"args": ARGS, "model": CONFIG}}, tmp_path / "in_memory.pt")
    sample.main(["--ckpt", str(tmp_path / "in_memory.pt")] + flags + ["--output", str(tmp_path / "d")])
    a, b, c, d = (pngs(tmp_path / name) for name in "abcd")
    assert sorted(a) == ["0000-class0.png", "0001-class3.png", "grid.png"]
    assert all(np.array_equal(a[k], other[k]) for other in (b, c, d) for k in a)


def test_export_keeps_an_earlier_export_unless_overwrite(trained, tmp_path, capsys):
    """A second export into the same folder is refused in one line (files untouched) until --overwrite; files are shareable."""
    out = tmp_path / "export"
    paths = export.main([trained, "--output", str(out), "--weights", "model"])
    assert len({os.stat(path).st_mode for path in paths.values()}) == 1  # model.safetensors as shareable as model.pt (umask)
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    for argv, needle in (([trained, "--output", str(out)], "already holds an export (model.safetensors, config.json, model.pt); add --overwrite"),
                         ([trained, "--output", paths["pt"]], "is a file"),
                         ([str(tmp_path / "nope"), "--output", str(tmp_path / "e")], f"error: {tmp_path / 'nope'}: no such file")):
        with pytest.raises(SystemExit):
            export.main(argv)
        assert needle in capsys.readouterr().err
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    export.main([trained, "--output", str(out), "--overwrite"])
    with open(out / "config.json") as f:
        assert json.load(f)["weights"] == "ema"


def sample_ranks(rank, world_size, argv):
    sample_ddp.main(argv)


def test_sample_ddp_distinct_per_rank_npz_and_resume(dt, trained, tmp_path):
    argv = ["--ckpt", trained, "--num_fid_samples", "5", "--per_proc_batch_size", "2", "--num_sampling_steps", "2", "--sample_dir", str(tmp_path), "--device", "cpu"]
    dt.run(sample_ranks, 2, argv)
    (npz,) = [f for f in os.listdir(tmp_path) if f.endswith(".npz")]
    folder = os.path.join(tmp_path, npz[: -len(".npz")])
    assert npz.startswith("DiT-S-2-run") and npz.endswith("size-16-vae-none-cfg-1.5-seed-0.npz")
    images = pngs(folder)
    assert sorted(images) == [f"{i:06d}.png" for i in range(5)]
    arr = np.load(os.path.join(tmp_path, npz))["arr_0"]
    assert arr.shape == (5, 16, 16, 3) and arr.dtype == np.uint8
    assert len({a.tobytes() for a in arr}) == 5  # every sample (ranks 0 and 1 alike) has its own seed
    assert np.array_equal(arr[2], images["000002.png"])  # rank 1 wrote 000002-000003
    os.remove(os.path.join(folder, "000003.png"))
    result = sample_ddp.main(argv)  # one process now: only the missing sample's batch is redone, identically
    assert [os.path.basename(f) for f in result["written"]] == ["000003.png"]
    assert np.array_equal(np.load(os.path.join(tmp_path, npz))["arr_0"], arr)
