"""Checkpoint folder layout: file names, finding the latest checkpoint, the RNG state saved with it, and safe reading.

Training checkpoints are DCP folders written by opendit/checkpoint/dcp.py (layout there).
"""
import os
import random
from typing import Any, Dict, Optional

import numpy as np
import torch

from opendit.errors import CheckpointError

LATEST = "latest"
MANIFEST = "manifest.json"
TRAIN_STATE = "train_state.pt"
STEP_PATTERN = r"step-\d{7}"
EXPORT_WEIGHTS, EXPORT_CONFIG = "model.safetensors", "config.json"


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
