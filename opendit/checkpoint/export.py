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
from opendit.checkpoint.weights import load_model_weights, weights_mismatch
from opendit.errors import CheckpointError, UsageError, run_or_exit
from opendit.utils.cli import HelpFormatter, output_folder_problem
from opendit.utils.media import atomic_path

OFFICIAL_LAYOUT = "model.pt"


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("ckpt", help="a training checkpoint folder, or an experiment folder (its latest checkpoint)")
    parser.add_argument("--output", required=True, help="folder to write model.safetensors, config.json and model.pt into")
    parser.add_argument("--weights", default="ema", choices=["ema", "model"], help="the EMA (DiT samples from it) or the raw model weights")
    parser.add_argument("--overwrite", action="store_true", help="replace the files of an earlier export in --output")
    return parser


def check_output(output: str, overwrite: bool) -> None:
    """--output must be a folder (or makeable as one) without an earlier export, unless overwrite."""
    problem = output_folder_problem("--output", output, "give the folder to export into")
    if problem:
        raise UsageError(problem)
    earlier = [name for name in (EXPORT_WEIGHTS, EXPORT_CONFIG, OFFICIAL_LAYOUT) if os.path.exists(os.path.join(output, name))]
    if earlier and not overwrite:
        raise UsageError(f"--output {output}: already holds an export ({', '.join(earlier)}); add --overwrite to replace it, or choose another folder")


def export(ckpt: str, output: str, weights: str = "ema", overwrite: bool = False) -> dict:
    """Write the three files, each atomically; returns their paths. The weights are checked against the config (strict load)."""
    from safetensors.torch import save_file

    check_output(output, overwrite)
    try:
        state_dict, config = load_model_weights(ckpt, use_ema=weights == "ema")
    except CheckpointError as e:  # its messages name sample.py's flag; here the checkpoint is the first argument
        raise CheckpointError(str(e).removeprefix("--ckpt ")) from None
    if not config or "model" not in config:
        raise UsageError(f"{ckpt}: holds no training config; only this project's training checkpoints can be exported")
    model = build_model(config["model"])
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        why = weights_mismatch(model, state_dict) or str(e).strip().splitlines()[-1][:300]
        raise CheckpointError(f"{ckpt}: weights do not fit the model config {config['model']} ({why})") from None
    state_dict = {name: tensor.contiguous() for name, tensor in state_dict.items()}
    os.makedirs(output, exist_ok=True)
    paths = {"safetensors": os.path.join(output, EXPORT_WEIGHTS), "config": os.path.join(output, EXPORT_CONFIG), "pt": os.path.join(output, OFFICIAL_LAYOUT)}
    with atomic_path(paths["safetensors"]) as tmp:
        save_file(state_dict, tmp, metadata={"format": "pt", "weights": weights})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors writes 0600; an export is for sharing, as model.pt and config.json are
    with atomic_path(paths["config"]) as tmp, open(tmp, "w") as f:
        json.dump({**config, "weights": weights, "source": os.path.abspath(ckpt)}, f, indent=2)
    with atomic_path(paths["pt"]) as tmp:
        torch.save(state_dict, tmp)
    return paths


def main(argv: Optional[list] = None) -> dict:
    args = get_parser().parse_args(argv)
    paths = run_or_exit(lambda a: export(a.ckpt, a.output, a.weights, a.overwrite), args)
    print(f"Exported the {args.weights} weights of {args.ckpt} to {', '.join(paths.values())}")
    return paths


if __name__ == "__main__":
    main()
