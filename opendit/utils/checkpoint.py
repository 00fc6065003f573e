"""Training checkpoints (atomic, resumable) and weight loading for sampling (never runs pickled code)."""
import os
import random
import shutil
from typing import Any, Dict, Optional

import numpy as np
import torch

from opendit.utils.distributed import barrier

LATEST = "latest"
STATE_FILE = "state.pt"
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
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- saving ------------------------------------------------------------------------------------
def _atomic_torch_save(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(checkpoint_dir: str, name: str, state: Dict[str, Any], rank: int, is_main: bool) -> str:
    """
    Write checkpoints/{name}/ atomically: rank 0 writes state.pt, every rank its RNG state, into a temporary
    folder that is renamed only when complete, then `latest` is pointed at it. A crash mid-save leaves the
    previous checkpoint (and `latest`) intact.
    """
    final = os.path.join(checkpoint_dir, name)
    tmp = os.path.join(checkpoint_dir, f".{name}.partial")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    _atomic_torch_save(rng_state(), os.path.join(tmp, f"rng-{rank:05d}.pt"))
    if is_main:
        _atomic_torch_save(state, os.path.join(tmp, STATE_FILE))
    barrier()
    if is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        latest_tmp = os.path.join(checkpoint_dir, f".{LATEST}.tmp")
        with open(latest_tmp, "w") as f:
            f.write(name + "\n")
        os.replace(latest_tmp, os.path.join(checkpoint_dir, LATEST))
    barrier()
    return final


# --- finding and loading -----------------------------------------------------------------------
def resolve_checkpoint_dir(path: str) -> str:
    """An experiment folder, its checkpoints/ folder or one checkpoint folder -> that checkpoint folder."""
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return path
    for folder in (os.path.join(path, "checkpoints"), path):
        pointer = os.path.join(folder, LATEST)
        if os.path.isfile(pointer):
            with open(pointer) as f:
                candidate = os.path.join(folder, f.read().strip())
            if os.path.isfile(os.path.join(candidate, STATE_FILE)):
                return candidate
            raise CheckpointError(f"{pointer} points to {candidate}, which holds no {STATE_FILE}")
    raise CheckpointError(f"{path}: not a checkpoint folder (no {STATE_FILE}) and no checkpoints/{LATEST} inside")


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


def load_training_state(checkpoint_dir: str, rank: int) -> Dict[str, Any]:
    """state.pt plus this rank's RNG state (None when the checkpoint was written by fewer ranks)."""
    state = torch_load(os.path.join(checkpoint_dir, STATE_FILE))
    rng_path = os.path.join(checkpoint_dir, f"rng-{rank:05d}.pt")
    state["rng"] = torch_load(rng_path) if os.path.isfile(rng_path) else None
    return state


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


def load_model_weights(path: str, use_ema: bool = True) -> tuple[Dict[str, torch.Tensor], Optional[Dict[str, Any]]]:
    """
    Weights for sampling from: this project's checkpoints (folder, experiment folder or state.pt; EMA by
    default), an official DiT .pt (a plain state dict), a .pt with an "ema"/"model" entry, or .safetensors.
    Returns (state_dict, training config or None).
    """
    if not os.path.exists(path) and os.path.basename(path) in OFFICIAL_DIT_CHECKPOINTS:
        path = _download_official(os.path.basename(path))
    if not os.path.exists(path):
        raise CheckpointError(f"--ckpt {path}: no such file or folder")
    if os.path.isdir(path):
        path = os.path.join(resolve_checkpoint_dir(path), STATE_FILE)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path), None
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
