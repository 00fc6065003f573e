"""Shared set-up for train.py and sample.py: model flag checks, the model and its geometry."""
from typing import Any, Dict

import torch

from opendit.errors import UsageError
from opendit.models import DiT_models, is_video_model, spatial_patch
from opendit.models.dit import DIT_SIZES

KNOWN_VAE_DOWNSAMPLE = {"none": 1, "ema": 8, "mse": 8}
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # --mixed_precision of train.py and sample.py


def patch_hw(model_name: str) -> int:
    """The spatial patch size of a registry model (2, 4 or 8)."""
    return spatial_patch(model_name)


def check_model_flags(model: str, image_size: int, vae: str, use_video: bool) -> None:
    """Fail fast, before anything heavy loads, on an unknown model or an image size the model cannot take."""
    if model not in DiT_models:
        raise UsageError(f"--model {model}: unknown model; choose one of {', '.join(DiT_models)}")
    if is_video_model(model) and not use_video:
        raise UsageError(f"--model {model} is a video model: add --use_video")
    if use_video and not is_video_model(model):
        raise UsageError(f"--use_video needs a video model (VDiT-*, Latte-*, vDiT-*/222), not --model {model}")
    if image_size <= 0:
        raise UsageError(f"--image_size {image_size}: must be positive")
    if vae in KNOWN_VAE_DOWNSAMPLE:  # other VAEs are checked once loaded (model_config)
        check_image_size(model, image_size, KNOWN_VAE_DOWNSAMPLE[vae])


def model_size(model: str, depth=None, hidden_size=None, num_heads=None) -> tuple:
    """(depth, hidden size, heads) of a registry model (DiT-XL/2, Latte-S/1x2x2, ...) with the flags' overrides."""
    sizes = DIT_SIZES[model.split("-")[1].split("/")[0]]
    return tuple(size if flag is None else flag for flag, size in zip((depth, hidden_size, num_heads), sizes))


def check_image_size(model: str, image_size: int, downsample: int) -> None:
    factor = downsample * patch_hw(model)
    if image_size % factor:
        raise UsageError(f"--image_size {image_size} is not divisible by {factor} (VAE downsampling {downsample} x patch size of {model})")


def model_config(args: Any, vae, text_encoder=None) -> Dict[str, Any]:
    """The constructor arguments that rebuild the model; stored in every checkpoint and in config.json."""
    check_image_size(args.model, args.image_size, vae.downsample)
    config = dict(
        model=args.model,
        input_size=args.image_size // vae.downsample,
        in_channels=vae.latent_channels,
        num_classes=args.num_classes,
    )
    if is_video_model(args.model):
        config["num_frames"] = args.num_frames
    for key in ("depth", "hidden_size", "num_heads"):
        if getattr(args, key, None) is not None:
            config[key] = getattr(args, key)
    if text_encoder is not None:  # text conditioning: pooled prompt embeddings of this width
        config["text_dim"] = text_encoder.dim
    return config


def build_model(config: Dict[str, Any]) -> torch.nn.Module:
    """Instantiate a registry model from a model_config() dict."""
    kwargs = {k: v for k, v in config.items() if k != "model"}
    try:
        return DiT_models[config["model"]](**kwargs)
    except (ValueError, AssertionError) as e:
        raise UsageError(f"--model {config['model']}: cannot be built with {kwargs} ({e})") from None


