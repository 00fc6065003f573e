"""Weights for sampling and export, on one process, from every accepted format (never runs pickled code).

Accepted: a training checkpoint (step folder or experiment folder: the DCP shards, the EMA by default), an export
folder or its model.safetensors, an official DiT .pt (a plain state dict), a .pt with an "ema"/"model" entry, or an
OpenDiT checkpoint folder (epochE-global_stepG/ with ema.pt and model/ shards, its experiment folder, or its model/).
"""
import glob
import json
import os
import re
import sys
from typing import Any, Dict, Optional

import torch

from opendit.checkpoint.layout import EXPORT_CONFIG, EXPORT_WEIGHTS, TRAIN_STATE, resolve_checkpoint_dir, torch_load
from opendit.errors import CheckpointError

OFFICIAL_DIT_CHECKPOINTS = {"DiT-XL-2-256x256.pt", "DiT-XL-2-512x512.pt"}

OFFICIAL_DIT_URL = "https://dl.fbaipublicfiles.com/DiT/models/{}"
SINGLE_SET = ("--ckpt {}: holds a single set of weights (an export, a .safetensors file or a plain state-dict .pt), not both the EMA and the raw model; "
              "the raw model weights (--use_model) come from a training checkpoint")


def _download_official(name: str) -> str:
    """Fetch one of Meta's DiT checkpoints into pretrained_models/ (needs network)."""
    local = os.path.join("pretrained_models", name)
    if not os.path.isfile(local):
        import socket

        from opendit.encoders.hub import STALL_TIMEOUT_S, probe

        url = OFFICIAL_DIT_URL.format(name)
        problem = probe(url)
        if problem:
            raise CheckpointError(f"--ckpt {name}: not a local file and {url.split('/')[2]} {problem}; pass a local checkpoint path")
        os.makedirs("pretrained_models", exist_ok=True)
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(STALL_TIMEOUT_S)  # torch.hub's urlopen sets none: a stalled transfer would wait forever
        try:
            torch.hub.download_url_to_file(url, local, progress=True)
        except Exception as e:
            raise CheckpointError(f"--ckpt {name}: not a local file and the download failed ({type(e).__name__})") from None
        finally:
            socket.setdefaulttimeout(previous)
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


# --- OpenDiT's checkpoint folders ----------------------------------------------------------------
# epoch{E}-global_step{G}/: model/ (ColossalAI's sharded save: an *.index.json whose weight_map names the shard of
# each key, shards as .bin or .safetensors, or one unsharded file), ema.pt (a plain fp32 state dict), optimizer/ and
# running_states.json. Keys are Meta DiT's, qkv in the standard layout (FastSeq converts back before saving).
OPENDIT_STEP = re.compile(r"epoch(\d+)-global_step(\d+)$")
OPENDIT_EMA, OPENDIT_MODEL, OPENDIT_STATES = "ema.pt", "model", "running_states.json"


def _is_sharded_dir(path: str) -> bool:
    """A HF/ColossalAI-style model folder: an index json with its shards, or one pytorch_model.bin / model.safetensors."""
    names = ("pytorch_model.bin", "model.safetensors")
    return os.path.isdir(path) and bool(glob.glob(os.path.join(path, "*index.json")) or any(os.path.isfile(os.path.join(path, n)) for n in names))


def is_opendit_folder(path: str) -> bool:
    """An OpenDiT step folder, an OpenDiT experiment folder holding step folders, or a step folder's model/."""
    if not os.path.isdir(path):
        return False
    if os.path.isfile(os.path.join(path, OPENDIT_EMA)) or os.path.isfile(os.path.join(path, OPENDIT_STATES)) or _is_sharded_dir(path):
        return True
    return any(OPENDIT_STEP.match(n) for n in os.listdir(path))


def _latest_opendit_step(path: str) -> str:
    """An OpenDiT experiment folder -> its step folder with the largest global step; a step folder -> itself."""
    steps = [(int(m.group(2)), n) for n in os.listdir(path) if (m := OPENDIT_STEP.match(n)) and os.path.isdir(os.path.join(path, n))]
    if os.path.isfile(os.path.join(path, OPENDIT_EMA)) or os.path.isdir(os.path.join(path, OPENDIT_MODEL)) or not steps:
        return path
    return os.path.join(path, max(steps)[1])


def _read_sharded(folder: str) -> Dict[str, torch.Tensor]:
    """All tensors of a sharded model folder (index json + .bin/.safetensors shards, or a single file)."""
    indexes = sorted(glob.glob(os.path.join(folder, "*index.json")))
    if indexes:
        index = _read_json(indexes[0])
        if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
            raise CheckpointError(f"{indexes[0]}: no weight_map (not a sharded-model index)")
        files = sorted(set(index["weight_map"].values()))
    else:
        files = [n for n in ("pytorch_model.bin", "model.safetensors") if os.path.isfile(os.path.join(folder, n))][:1]
    weights: Dict[str, torch.Tensor] = {}
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"{folder}: shard {name} named by the index is missing")
        weights.update(_load_safetensors(path)[0] if name.endswith(".safetensors") else torch_load(path))
    if indexes and set(weights) != set(index["weight_map"]):
        raise CheckpointError(f"{folder}: the shards hold {len(weights)} tensors, the index names {len(index['weight_map'])}")
    return weights


def _meta_names(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Strip wrapper prefixes (DDP's "module.", torch.compile's "_orig_mod.") and cast to fp32 (shards are saved in the working dtype)."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            key = key[len(prefix):] if key.startswith(prefix) else key
        out[key] = value.float() if torch.is_tensor(value) and value.is_floating_point() else value
    return out


def load_opendit_folder(path: str, use_ema: bool = True) -> Dict[str, torch.Tensor]:
    """Weights of an OpenDiT checkpoint (step folder, experiment folder or model/ folder) under this project's names:
    ema.pt by default (else model/), the model/ shards when asked for or when there is no ema.pt."""
    if _is_sharded_dir(path) and not os.path.isfile(os.path.join(path, OPENDIT_EMA)):
        return _meta_names(_read_sharded(path))  # a model/ folder: the model weights were asked for by its name
    step = _latest_opendit_step(path)
    ema, model = os.path.join(step, OPENDIT_EMA), os.path.join(step, OPENDIT_MODEL)
    if use_ema and os.path.isfile(ema):
        state = torch_load(ema)
        if not isinstance(state, dict):
            raise CheckpointError(f"{ema}: expected a state dict, got {type(state).__name__}")
        return _meta_names(state.get("ema", state))
    if _is_sharded_dir(model):
        if use_ema:
            print(f"note: {step} has no {OPENDIT_EMA}; using the model weights of {OPENDIT_MODEL}/", file=sys.stderr)
        return _meta_names(_read_sharded(model))
    raise CheckpointError(f"{path}: an OpenDiT checkpoint folder needs {OPENDIT_EMA} or {OPENDIT_MODEL}/ with its shards")


def load_model_weights(path: str, use_ema: bool = True) -> tuple[Dict[str, torch.Tensor], Optional[Dict[str, Any]]]:
    """
    Weights for sampling, on this process alone, from: a training checkpoint (step folder or experiment folder; the
    EMA by default, read from the DCP shards), an export folder or its model.safetensors (opendit/export.py), an
    official DiT .pt (a plain state dict), a .pt with an "ema"/"model" entry, or an OpenDiT checkpoint folder.
    Returns (state_dict, training config or None). use_ema=False (the raw model weights) is refused for the formats
    that hold a single set of weights (export, .safetensors, plain state dict).
    """
    if not os.path.exists(path) and os.path.basename(path) in OFFICIAL_DIT_CHECKPOINTS:
        path = _download_official(os.path.basename(path))
    if not os.path.exists(path):
        raise CheckpointError(f"--ckpt {path}: no such file or folder")
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, EXPORT_WEIGHTS)):
        path = os.path.join(path, EXPORT_WEIGHTS)
    if path.endswith(".safetensors"):
        if not use_ema:
            raise CheckpointError(SINGLE_SET.format(path))
        return _load_safetensors(path)
    if is_opendit_folder(path):
        return load_opendit_folder(path, use_ema), None
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
    if not use_ema:
        raise CheckpointError(SINGLE_SET.format(path))
    return obj, config  # a plain state dict, as in Meta's released checkpoints


def weights_mismatch(model: torch.nn.Module, state_dict: dict) -> str:
    """How state_dict differs from the model's own: a count and the first few names of each kind of difference."""
    own = model.state_dict()
    kinds = {
        "missing": [k for k in own if k not in state_dict],
        "unexpected": [k for k in state_dict if k not in own],
        "of another shape": [f"{k} {list(state_dict[k].shape)} in the file, {list(own[k].shape)} in the model"
                             for k in own if k in state_dict and state_dict[k].shape != own[k].shape],
    }
    return "; ".join(f"{len(keys)} {kind}: {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}" for kind, keys in kinds.items() if keys)
