"""Weights for sampling and export, on one process, from every accepted format (never runs pickled code).

Accepted: a training checkpoint (step folder or experiment folder: the DCP shards, the EMA by default), an export
folder or its model.safetensors, an official DiT .pt (a plain state dict), or a .pt with an "ema"/"model" entry.
"""
import json
import os
from typing import Any, Dict, Optional

import torch

from opendit.checkpoint.layout import EXPORT_CONFIG, EXPORT_WEIGHTS, TRAIN_STATE, resolve_checkpoint_dir
from opendit.errors import CheckpointError

OFFICIAL_DIT_CHECKPOINTS = {"DiT-XL-2-256x256.pt", "DiT-XL-2-512x512.pt"}

OFFICIAL_DIT_URL = "https://dl.fbaipublicfiles.com/DiT/models/{}"


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
        from opendit.encoders.hub import reachable

        if not reachable(OFFICIAL_DIT_URL):
            raise CheckpointError(f"--ckpt {name}: not a local file and {OFFICIAL_DIT_URL.split('/')[2]} cannot be reached; pass a local checkpoint path")
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
        from opendit.checkpoint.dcp import read_tensors

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
