"""Finding checkpoints, RNG state, and weight loading for sampling (never runs pickled code).

Training checkpoints are DCP folders written by opendit/distributed/checkpoint.py (layout there).
"""
import json
import os
import random
from typing import Any, Dict, Optional

import numpy as np
import torch

LATEST = "latest"
MANIFEST = "manifest.json"
TRAIN_STATE = "train_state.pt"
STEP_PATTERN = r"step-\d{7}"
EXPORT_WEIGHTS, EXPORT_CONFIG = "model.safetensors", "config.json"
OFFICIAL_DIT_CHECKPOINTS = {"DiT-XL-2-256x256.pt", "DiT-XL-2-512x512.pt"}
OFFICIAL_DIT_URL = "https://dl.fbaipublicfiles.com/DiT/models/{}"


class CheckpointError(ValueError):
    """A checkpoint path that cannot be used; the message is one line naming it."""


# --- random number generator state -------------------------------------------------------------
def rng_state() -> Dict[str, Any]:
    """Every RNG this process draws from, in a form torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's device only (one GPU per rank)
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --- finding and loading -----------------------------------------------------------------------
def is_checkpoint_folder(path: str) -> bool:
    """A step folder (finished or not): what --load accepts directly; completeness is checked when loading."""
    return os.path.isdir(path) and (any(os.path.exists(os.path.join(path, f)) for f in (MANIFEST, TRAIN_STATE, ".metadata")) or ".step-" in os.path.basename(path))


def _pointed(folder: str) -> Optional[str]:
    """The checkpoint that {folder}/latest names, or None when there is no such pointer."""
    pointer = os.path.join(folder, LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        return os.path.join(folder, f.read().strip())


def latest_checkpoint(experiment_dir: str) -> Optional[str]:
    """The checkpoint that {experiment_dir}/checkpoints/latest names, or None when there is none yet."""
    return _pointed(os.path.join(experiment_dir, "checkpoints"))


def resolve_checkpoint_dir(path: str) -> str:
    """An experiment folder, its checkpoints/ folder or one checkpoint folder -> that checkpoint folder."""
    if is_checkpoint_folder(path):
        return path
    found = latest_checkpoint(path) or _pointed(path)
    if found:
        return found
    raise CheckpointError(f"{path}: not a checkpoint folder and no checkpoints/{LATEST} inside")


def experiment_dir_of(checkpoint_dir: str) -> str:
    """checkpoints/{name} -> the experiment folder above it."""
    return os.path.dirname(os.path.dirname(os.path.abspath(checkpoint_dir)))


def torch_load(path: str) -> Any:
    """torch.load restricted to tensors and plain containers: a checkpoint can never run code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as e:  # truncated, corrupt, or carrying pickled code
        raise CheckpointError(f"{path}: cannot be read as a weights-only checkpoint ({type(e).__name__}: {e})".split("\n")[0]) from None


def _download_official(name: str) -> str:
    """Fetch one of Meta's DiT checkpoints into pretrained_models/ (needs network)."""
    local = os.path.join("pretrained_models", name)
    if not os.path.isfile(local):
        os.makedirs("pretrained_models", exist_ok=True)
        try:
            torch.hub.download_url_to_file(OFFICIAL_DIT_URL.format(name), local, progress=True)
        except Exception as e:
            raise CheckpointError(f"--ckpt {name}: not a local file and the download failed ({type(e).__name__})") from None
    return local


def _read_json(path: str) -> Optional[Dict[str, Any]]:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _load_safetensors(path: str) -> tuple[Dict[str, torch.Tensor], Optional[Dict[str, Any]]]:
    """An exported model.safetensors, with the config.json beside it when there is one (see opendit/export.py)."""
    from safetensors.torch import load_file

    try:
        weights = load_file(path)
    except Exception as e:
        raise CheckpointError(f"--ckpt {path}: cannot be read as safetensors ({type(e).__name__}: {e})".split("\n")[0]) from None
    return weights, _read_json(os.path.join(os.path.dirname(path), EXPORT_CONFIG))


def load_model_weights(path: str, use_ema: bool = True) -> tuple[Dict[str, torch.Tensor], Optional[Dict[str, Any]]]:
    """
    Weights for sampling, on this process alone, from: a training checkpoint (step folder or experiment folder; the
    EMA by default, read from the DCP shards), an export folder or its model.safetensors (opendit/export.py), an
    official DiT .pt (a plain state dict), or a .pt with an "ema"/"model" entry. Returns (state_dict, training
    config or None).
    """
    if not os.path.exists(path) and os.path.basename(path) in OFFICIAL_DIT_CHECKPOINTS:
        path = _download_official(os.path.basename(path))
    if not os.path.exists(path):
        raise CheckpointError(f"--ckpt {path}: no such file or folder")
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, EXPORT_WEIGHTS)):
        path = os.path.join(path, EXPORT_WEIGHTS)
    if path.endswith(".safetensors"):
        return _load_safetensors(path)
    if os.path.isdir(path):
        from opendit.distributed.checkpoint import read_tensors

        folder = resolve_checkpoint_dir(path)
        weights = read_tensors(folder, "ema" if use_ema else "model")  # verifies the folder first
        return weights, torch_load(os.path.join(folder, TRAIN_STATE)).get("config")
    obj = torch_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"--ckpt {path}: expected a state dict, got {type(obj).__name__}")
    config = obj.get("config")
    key = "ema" if use_ema else "model"
    if key in obj:
        return obj[key], config
    if "ema" in obj or "model" in obj:
        raise CheckpointError(f"--ckpt {path}: holds no '{key}' weights")
    return obj, config  # a plain state dict, as in Meta's released checkpoints
