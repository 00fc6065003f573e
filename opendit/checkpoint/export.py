"""Export a training checkpoint's weights for sampling and sharing, on one process (no GPU, no process group).

    python -m opendit.export CKPT --output DIR [--weights ema|model]

CKPT is a step folder or an experiment folder (its latest checkpoint). DIR receives:
    model.safetensors   the consolidated weights (the EMA by default), Meta DiT's parameter names
    config.json         the training config; `sample.py --ckpt DIR` (or --ckpt DIR/model.safetensors) reads both
    model.pt            the same weights as a plain state_dict, the layout of Meta's DiT-XL-2-256x256.pt
"""
import argparse
import json
import os
from typing import Optional

import torch

from opendit.builders import build_model
from opendit.checkpoint.layout import EXPORT_CONFIG, EXPORT_WEIGHTS
from opendit.checkpoint.weights import load_model_weights
from opendit.errors import CheckpointError, UsageError, run_or_exit

OFFICIAL_LAYOUT = "model.pt"


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", help="a training checkpoint folder, or an experiment folder (its latest checkpoint)")
    parser.add_argument("--output", required=True, help="folder to write model.safetensors, config.json and model.pt into")
    parser.add_argument("--weights", default="ema", choices=["ema", "model"], help="the EMA (DiT samples from it) or the raw model weights")
    return parser


def export(ckpt: str, output: str, weights: str = "ema") -> dict:
    """Write the three files; returns their paths. The weights are checked against the config (strict load)."""
    from safetensors.torch import save_file

    state_dict, config = load_model_weights(ckpt, use_ema=weights == "ema")
    if not config or "model" not in config:
        raise UsageError(f"{ckpt}: holds no training config; only this project's training checkpoints can be exported")
    try:
        build_model(config["model"]).load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt}: weights do not fit the model config {config['model']} ({str(e).splitlines()[1].strip()})") from None
    state_dict = {name: tensor.contiguous() for name, tensor in state_dict.items()}
    os.makedirs(output, exist_ok=True)
    paths = {"safetensors": os.path.join(output, EXPORT_WEIGHTS), "config": os.path.join(output, EXPORT_CONFIG), "pt": os.path.join(output, OFFICIAL_LAYOUT)}
    save_file(state_dict, paths["safetensors"], metadata={"format": "pt", "weights": weights})
    with open(paths["config"], "w") as f:
        json.dump({**config, "weights": weights, "source": os.path.abspath(ckpt)}, f, indent=2)
    torch.save(state_dict, paths["pt"])
    return paths


def main(argv: Optional[list] = None) -> dict:
    args = get_parser().parse_args(argv)
    paths = run_or_exit(lambda a: export(a.ckpt, a.output, a.weights), args)
    print(f"Exported the {args.weights} weights of {args.ckpt} to {', '.join(paths.values())}")
    return paths


if __name__ == "__main__":
    main()
