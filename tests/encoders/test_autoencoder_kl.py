"""Our AutoencoderKL against diffusers' (the independent implementation): same files, same numbers, both ways."""
import json
import os
import subprocess
import sys

import pytest
import torch

from opendit.encoders import build_vae
from opendit.encoders.autoencoder_kl import OLD_ATTENTION_NAMES, AutoencoderKL, KLConfig

pytestmark = pytest.mark.usefixtures("no_network")

CONFIGS = {
    "tiny": dict(block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8),
    "three stages": dict(block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8, latent_channels=8, scaling_factor=0.5),
    "no quant convs, shifted (SD3-like)": dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False,
                                               shift_factor=0.1, scaling_factor=1.5),
    "no mid attention": dict(block_out_channels=(16, 16), layers_per_block=1, norm_num_groups=8, mid_block_add_attention=False),
}


def diffusers_model(config: dict):
    from diffusers import AutoencoderKL as DiffusersKL

    n = len(config["block_out_channels"])
    torch.manual_seed(0)
    model = DiffusersKL(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n, **config)
    with torch.no_grad():
        for p in model.parameters():  # diffusers initialises GroupNorm to (1, 0) and biases to 0: make every weight count
            p.add_(torch.randn_like(p) * 0.05)
    return model.double().eval()


def assert_same(ours: AutoencoderKL, theirs, downsample: int):
    x = torch.rand(2, 3, 4 * downsample, 3 * downsample, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        moments = ours.encode(x)
        posterior = theirs.encode(x).latent_dist
        mean, logvar = moments.chunk(2, dim=1)
        torch.testing.assert_close(mean, posterior.mean, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(logvar.clamp(-30.0, 20.0), posterior.logvar, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ours.decode(mean), theirs.decode(mean).sample, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_loads_a_diffusers_folder_and_computes_the_same(tmp_path, name):
    theirs = diffusers_model(CONFIGS[name])
    theirs.save_pretrained(tmp_path)
    ours = AutoencoderKL.from_pretrained(str(tmp_path)).double().eval()
    assert ours.config.shift_factor == CONFIGS[name].get("shift_factor") and ours.config.scaling_factor == theirs.config.scaling_factor
    assert_same(ours, theirs, 2 ** (len(CONFIGS[name]["block_out_channels"]) - 1))


def test_diffusers_loads_what_we_write(tmp_path):
    from diffusers import AutoencoderKL as DiffusersKL

    torch.manual_seed(1)
    ours = AutoencoderKL(KLConfig(**CONFIGS["three stages"])).double().eval()
    ours.save_pretrained(str(tmp_path))
    theirs = DiffusersKL.from_pretrained(str(tmp_path)).double().eval()
    assert_same(ours, theirs, 4)


def test_old_attention_names_in_a_bin_file(tmp_path):
    """sd-vae-ft-ema's files predate diffusers 0.14: query / key / value / proj_attn, in diffusion_pytorch_model.bin."""
    theirs = diffusers_model(CONFIGS["tiny"])
    new_names = {v: k for k, v in OLD_ATTENTION_NAMES.items()}
    old = {}
    for key, value in theirs.state_dict().items():
        for new, name in new_names.items():
            if f".attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{name}.")
        old[key] = value.float()
    assert any(".proj_attn." in k for k in old)
    torch.save(old, tmp_path / "diffusion_pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(theirs.config))
    assert_same(AutoencoderKL.from_pretrained(str(tmp_path)).double().eval(), theirs.float().double(), 2)


@pytest.mark.parametrize("problem", ["other class", "cross-attention blocks", "gelu", "weights of another size", "truncated weights", "no weights"])
def test_unusable_folders_are_one_line_errors(tmp_path, problem):
    AutoencoderKL(KLConfig(**CONFIGS["tiny"])).save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    if problem == "other class":
        config["_class_name"] = "AutoencoderTiny"
    elif problem == "cross-attention blocks":
        config["down_block_types"] = ["CrossAttnDownBlock2D", "DownEncoderBlock2D"]
    elif problem == "gelu":
        config["act_fn"] = "gelu"
    elif problem == "weights of another size":
        config["block_out_channels"] = [32, 64]
    elif problem == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        weights.unlink()
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as info:
        build_vae(str(tmp_path))
    message = str(info.value)
    assert message.startswith(f"--vae {tmp_path}: ") and "\n" not in message, message


def test_hub_download_falls_back_to_the_bin_file(tmp_path, monkeypatch):
    """A hub repo with config.json and only the .bin weights (older repos): the snapshot folder is returned."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    from opendit.encoders.vae import _download

    AutoencoderKL(KLConfig(**CONFIGS["tiny"])).save_pretrained(str(tmp_path))
    asked = []

    def fake_download(repo, filename, local_files_only=False):
        asked.append((repo, filename, local_files_only))
        if filename.endswith(".safetensors"):
            raise EntryNotFoundError(f"{filename} not in {repo}")
        return os.path.join(str(tmp_path), filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert _download("org/vae", local_only=True) == str(tmp_path)
    assert [name for _, name, _ in asked] == ["config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"]
    assert all(local for _, _, local in asked)


def test_loading_a_vae_does_not_import_diffusers(tmp_path):
    """The point of this module: sample.py with the SD VAE no longer pays diffusers' import (seconds)."""
    AutoencoderKL(KLConfig(**CONFIGS["tiny"])).save_pretrained(str(tmp_path / "vae"))
    code = (f"import sys, torch; from opendit.encoders import load_vae; vae = load_vae({str(tmp_path / 'vae')!r}, torch.device('cpu')); "
            "vae.decode(vae.encode(torch.zeros(1, 3, 8, 8))); import opendit.sampling.sample; "
            "print(sorted(m for m in ('diffusers', 'transformers', 'torch._dynamo') if m in sys.modules))")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env=dict(os.environ, PYTHONPATH=root), timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
