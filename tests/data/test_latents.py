"""The latent cache: encoding once then sampling the stored posterior equals encoding on the fly; captions, flips,
resumable rank-sharded writing; prepare_batch."""

import json
import os

import pytest
import torch

from opendit import preprocess
from opendit.errors import UsageError
from opendit.data.batch import TEXT_DROP_PROB, prepare_batch
from opendit.data.image import ImageFolderDataset
from opendit.data.latents import LatentDataset
from opendit.encoders import build_text_encoder, build_vae


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two classes of 5 small images each."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"class{c}").mkdir()
        for k in range(5):
            Image.fromarray(rng.integers(0, 256, (20 + k, 18, 3), dtype=np.uint8)).save(root / f"class{c}" / f"{k}.png")
    return str(root)


def extract(data_path, output, vae_dir, *extra):
    preprocess.main(["latents", "--data_path", data_path, "--output", str(output), "--vae", vae_dir, "--image_size", "16", "--shard_size", "4",
                     "--batch_size", "3", "--num_workers", "0", "--dtype", "fp32", "--num_classes", "2", *extra])


def test_cache_round_trip_equals_on_the_fly_encoding(images, vae_dir, tmp_path):
    extract(images, tmp_path / "cache", vae_dir)
    with open(tmp_path / "cache" / "index.json") as f:
        index = json.load(f)
    assert index["count"] == 10 and [s["count"] for s in index["shards"]] == [4, 4, 2]
    assert index["latent_shape"] == [4, 8, 8] and index["vae"] == vae_dir and index["scaling_factor"] == 0.18215
    assert index["max_label"] == 1 and index["text_dim"] == 0 and index["image_size"] == 16

    vae = build_vae(vae_dir)
    pixels = ImageFolderDataset(images, 16, train=False)
    cache = LatentDataset(str(tmp_path / "cache"), train=False)
    x = torch.stack([pixels[i]["x"] for i in range(10)])
    batch = {"x": torch.stack([cache[i]["x"] for i in range(10)]), "x_std": torch.stack([cache[i]["x_std"] for i in range(10)]),
             "y": torch.tensor([cache[i]["y"] for i in range(10)])}
    assert batch["y"].tolist() == [pixels[i]["y"] for i in range(10)]
    torch.testing.assert_close(batch["x"], vae.encode(x, sample=False), atol=1e-5, rtol=1e-5)
    cached, kwargs = prepare_batch(batch, vae, None, torch.device("cpu"), train=True, generator=torch.Generator().manual_seed(7))
    on_the_fly, fly_kwargs = prepare_batch({"x": x, "y": batch["y"]}, vae, None, torch.device("cpu"), train=True, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(cached, on_the_fly, atol=1e-5, rtol=1e-5)
    assert torch.equal(kwargs["y"], fly_kwargs["y"]) and "text" not in kwargs

    flipped = LatentDataset(str(tmp_path / "cache"), train=True)
    means = {bool(torch.allclose(flipped[3]["x"], cache[3]["x"])) for _ in range(20)}
    assert means == {True, False}  # each item comes un-flipped or flipped at random
    mirror = vae.encode(x[3:4].flip(-1), sample=False)[0]
    assert any(torch.allclose(flipped[3]["x"], mirror, atol=1e-5) for _ in range(20))


def test_captions_are_cached_with_the_null_prompt(images, vae_dir, clip_dir, tmp_path):
    (tmp_path / "t2i.csv").write_text("".join(f"{images}/class{i % 2}/{i // 2}.png,picture {i},{i % 2}\n" for i in range(6)))
    extract(str(tmp_path / "t2i.csv"), tmp_path / "cache", vae_dir, "--text_encoder", clip_dir)
    clip = build_text_encoder(clip_dir)
    cache = LatentDataset(str(tmp_path / "cache"), train=False)
    assert cache.has_text and cache.meta["text_encoder"] == clip_dir and cache.meta["text_dim"] == 16
    torch.testing.assert_close(cache[4]["text_emb"], clip.encode(["picture 4"])[0])
    prompts = cache.prompt_cache("cpu")
    torch.testing.assert_close(prompts.null_embedding(), clip.null_embedding())

    n = 200  # the 10% caption drop: the null prompt's embedding replaces the cached one, drawn from the generator
    batch = {"x": torch.zeros(n, 4, 8, 8), "x_std": torch.zeros(n, 4, 8, 8), "text_emb": cache[4]["text_emb"].expand(n, -1).clone()}
    _, kwargs = prepare_batch(batch, None, prompts, torch.device("cpu"), train=True, generator=torch.Generator().manual_seed(0))
    dropped = (kwargs["text"] - prompts.null_embedding()).abs().sum(1) == 0
    assert 0.03 < dropped.float().mean() < 0.2
    _, again = prepare_batch(batch, None, prompts, torch.device("cpu"), train=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(kwargs["text"], again["text"])
    _, evaluation = prepare_batch(batch, None, prompts, torch.device("cpu"), train=False)
    assert torch.equal(evaluation["text"], batch["text_emb"])


def test_prepare_batch_drops_captions_to_the_empty_prompt(clip_dir):
    clip = build_text_encoder(clip_dir)
    vae = build_vae("none")
    captions = [f"caption {i}" for i in range(100)]
    x, kwargs = prepare_batch({"x": torch.zeros(100, 3, 4, 4), "text": captions}, vae, clip, torch.device("cpu"), train=True,
                              generator=torch.Generator().manual_seed(1))
    drop = torch.rand(100, generator=torch.Generator().manual_seed(1)) < TEXT_DROP_PROB
    expected = clip.encode(["" if d else c for d, c in zip(drop.tolist(), captions)])
    torch.testing.assert_close(kwargs["text"], expected)
    assert torch.equal(x, torch.zeros(100, 3, 4, 4)) and "y" not in kwargs


def test_resume_skips_written_shards_and_refuses_other_settings(images, vae_dir, tmp_path, monkeypatch):
    extract(images, tmp_path / "clean", vae_dir)
    real = preprocess.write_shard
    calls = []

    def crash_after_one(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt  # the job is killed while writing the second shard
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(preprocess, "write_shard", crash_after_one)
    with pytest.raises(KeyboardInterrupt):
        extract(images, tmp_path / "cache", vae_dir)
    assert sorted(os.listdir(tmp_path / "cache")) == ["shard-000000.safetensors"]  # no temp file, no index
    first = os.stat(tmp_path / "cache" / "shard-000000.safetensors").st_mtime_ns
    monkeypatch.setattr(preprocess, "write_shard", real)
    extract(images, tmp_path / "cache", vae_dir)
    assert os.stat(tmp_path / "cache" / "shard-000000.safetensors").st_mtime_ns == first  # skipped, not rewritten
    a, b = LatentDataset(str(tmp_path / "cache"), train=False), LatentDataset(str(tmp_path / "clean"), train=False)
    assert len(a) == len(b) == 10 and all(torch.equal(a[i]["x"], b[i]["x"]) for i in range(10))
    with pytest.raises(SystemExit):
        extract(images, tmp_path / "cache", vae_dir, "--dtype", "fp16")


def test_bad_caches_are_one_line_errors(images, vae_dir, tmp_path):
    extract(images, tmp_path / "cache", vae_dir)
    os.remove(tmp_path / "cache" / "shard-000001.safetensors")
    with pytest.raises(UsageError, match="1 shards of index.json are missing"):
        LatentDataset(str(tmp_path / "cache"))
    with pytest.raises(UsageError, match="no readable index.json"):
        LatentDataset(str(tmp_path))


def test_truncated_shard_is_one_line_naming_it(images, vae_dir, tmp_path):
    extract(images, tmp_path / "cache", vae_dir)
    shard = tmp_path / "cache" / "shard-000001.safetensors"
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 10)
    with pytest.raises(UsageError) as error:
        LatentDataset(str(tmp_path / "cache"))
    message = str(error.value)
    assert message.startswith(f"{shard}: unreadable latent cache shard (SafetensorError") and message.endswith("rerun preprocess.py latents") and "\n" not in message


def test_video_cache_records_and_checks_frame_interval(tmp_path, capsys):
    from opendit.training import train as train_cli

    clips = ["--use_video", "--num_frames", "2", "--image_size", "16", "--vae", "none", "--num_classes", "2"]
    preprocess.main(["latents", "--dataset", "shapes", "--data_path", "shapes", "--dataset_size", "4", "--output", str(tmp_path / "cache"), "--shard_size", "4",
                     "--batch_size", "4", "--num_workers", "0", "--dtype", "fp32", "--frame_interval", "3", "--captions", "off", *clips])
    base = ["--model", "VDiT-S/1x2x2", "--depth", "1", "--hidden_size", "32", "--num_heads", "2", "--batch_size", "2", "--max_steps", "1",
            "--mixed_precision", "fp32", "--num_workers", "0", "--data_path", str(tmp_path / "cache"), "--outputs", str(tmp_path / "o"), *clips]
    with pytest.raises(SystemExit):
        train_cli.main(base)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"error: {tmp_path / 'cache' / 'index.json'}: made with frame_interval 3, but the flags give --frame_interval 1"]
    train_cli.main(base + ["--frame_interval", "3"])
    (run,) = os.listdir(tmp_path / "o")
    assert json.loads((tmp_path / "o" / run / "config.json").read_text())["args"]["frame_interval"] == 3


def test_training_flags_must_match_the_cache(images, vae_dir, tmp_path, capsys):
    from opendit.training import train as train_cli

    extract(images, tmp_path / "cache", vae_dir)
    base = ["--model", "DiT-S/2", "--depth", "1", "--hidden_size", "32", "--num_heads", "2", "--vae", vae_dir, "--batch_size", "2",
            "--max_steps", "1", "--mixed_precision", "fp32", "--num_workers", "0", "--data_path", str(tmp_path / "cache"), "--outputs", str(tmp_path / "o")]
    for flags, needle in ((["--image_size", "32", "--num_classes", "2"], "made with image_size 16, but the flags give --image_size 32"),
                          (["--image_size", "16", "--num_classes", "1"], "labels go up to 1, outside [0, --num_classes 1)"),
                          (["--image_size", "16", "--num_classes", "2", "--vae", "none"], "made with vae")):
        with pytest.raises(SystemExit):
            train_cli.main(base + flags)
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
