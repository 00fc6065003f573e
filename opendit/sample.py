"""Sample images (PNG grid + one file each) or videos (one mp4 each) from a trained DiT / VDiT."""
import argparse
import json
import os
import sys
from typing import Optional

import torch

from opendit.builders import UsageError, build_model, check_model_flags, load_vae, model_config, parse_labels
from opendit.diffusion import create_diffusion
from opendit.utils.checkpoint import CheckpointError, load_model_weights

SAMPLERS = ("ddpm", "ddim", "dpm-solver")
# Flags that fall back to the checkpoint's training config when not given, then to these defaults.
MODEL_DEFAULTS = dict(model="DiT-XL/2", vae="ema", image_size=256, num_classes=1000, num_frames=16, noise_schedule="linear")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # OpenDiT's flags; model flags default to the checkpoint's training config, then to DiT-XL/2 at 256.
    parser.add_argument("--model", type=str, default=None, help=f"registry name (default: from the checkpoint, else {MODEL_DEFAULTS['model']})")
    parser.add_argument("--vae", type=str, default=None, help="ema | mse | none | PATH (default: from the checkpoint, else ema)")
    parser.add_argument("--image_size", type=int, default=None, help="image side in pixels (default: from the checkpoint, else 256)")
    parser.add_argument("--num_classes", type=int, default=None, help="class-table size (default: from the checkpoint, else 1000)")
    parser.add_argument("--cfg_scale", type=float, default=4.0, help="classifier-free guidance scale (<= 1: no guidance)")
    parser.add_argument("--num_sampling_steps", type=int, default=250, help="denoising steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_frames", type=int, default=None, help="frames per video (default: from the checkpoint, else 16)")
    parser.add_argument("--noise_schedule", type=str, default=None, choices=["linear", "squaredcos_cap_v2"], help="beta schedule (default: from the checkpoint, else linear)")
    parser.add_argument("--frame_interval", type=int, default=1, help="temporal stride the model was trained with (video)")
    parser.add_argument("--use_video", action="store_true", help="sample a video model (VDiT)")
    parser.add_argument("--text_encoder", type=str, default="openai/clip-vit-base-patch32", help="text encoder for prompts")
    parser.add_argument("--ckpt", type=str, required=True, help="checkpoint: this project's (folder, experiment folder, state.pt), an official DiT .pt, or .safetensors")
    # Additions.
    parser.add_argument("--sampler", type=str, default="ddpm", choices=SAMPLERS)
    parser.add_argument("--output", type=str, default="samples", help="output folder")
    parser.add_argument("--labels", type=str, default=None, help="comma-separated class labels, or 'all' (default: DiT's 8 ImageNet classes, or 0..9)")
    parser.add_argument("--per_class", type=int, default=1, help="samples per label")
    parser.add_argument("--batch_size", type=int, default=64, help="samples per forward pass (before the CFG doubling)")
    parser.add_argument("--cfg_channels", type=str, default="3", choices=["3", "all"], help="channels guided: 3 as in DiT's published numbers, or all")
    parser.add_argument("--use_model", action="store_true", help="use the raw model weights instead of the EMA")
    parser.add_argument("--fps", type=float, default=20, help="frames per second of the mp4 files")
    parser.add_argument("--check_fidelity", action="store_true", help="score samples with the built-in shapes class-fidelity checker")
    parser.add_argument("--device", type=str, default="auto", choices=["auto", "cpu", "cuda"])
    return parser


def resolve_model_flags(args: argparse.Namespace, train_config: Optional[dict]) -> None:
    """Fill unset model flags from the checkpoint's training config, then from OpenDiT's defaults."""
    saved_args = (train_config or {}).get("args", {})
    saved_model = (train_config or {}).get("model", {})
    for key, default in MODEL_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, saved_args.get(key, default))
    for key in ("depth", "hidden_size", "num_heads"):
        setattr(args, key, saved_model.get(key))
    if saved_args.get("use_video"):
        args.use_video = True


def denoise(args: argparse.Namespace, model: torch.nn.Module, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Run the chosen sampler from noise z with labels y, with classifier-free guidance when cfg_scale > 1."""
    use_cfg = args.cfg_scale > 1.0
    if use_cfg:
        z = torch.cat([z, z], dim=0)
        y = torch.cat([y, torch.full_like(y, args.num_classes)], dim=0)  # the null class is num_classes
        model_kwargs = dict(y=y, cfg_scale=args.cfg_scale, cfg_channels=None if args.cfg_channels == "all" else 3)
        model_fn = model.forward_with_cfg
    else:
        model_kwargs = dict(y=y)
        model_fn = model.forward
    if args.sampler == "ddpm":
        diffusion = create_diffusion(str(args.num_sampling_steps), noise_schedule=args.noise_schedule)
        samples = diffusion.p_sample_loop(model_fn, z.shape, z, clip_denoised=args.vae == "none", model_kwargs=model_kwargs, device=z.device, progress=True)
    elif args.sampler == "ddim":
        diffusion = create_diffusion(f"ddim{args.num_sampling_steps}", noise_schedule=args.noise_schedule)
        samples = diffusion.ddim_sample_loop(model_fn, z.shape, z, clip_denoised=args.vae == "none", model_kwargs=model_kwargs, device=z.device, progress=True)
    else:
        diffusion = create_diffusion("", noise_schedule=args.noise_schedule)
        samples = diffusion.dpm_solver_sample_loop(model_fn, z.shape, num_steps=args.num_sampling_steps, noise=z, model_kwargs=model_kwargs, device=z.device, progress=True)
    return samples.chunk(2, dim=0)[0] if use_cfg else samples


@torch.no_grad()
def sample(args: argparse.Namespace) -> dict:
    if args.num_sampling_steps < 1 or args.per_class < 1 or args.batch_size < 1:
        raise UsageError("--num_sampling_steps, --per_class and --batch_size must be at least 1")
    state_dict, train_config = load_model_weights(args.ckpt, use_ema=not args.use_model)
    resolve_model_flags(args, train_config)
    check_model_flags(args.model, args.image_size, args.vae, args.use_video)
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.set_flush_denormal(True)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")

    vae = load_vae(args.vae, device)
    config = model_config(args, vae)
    model = build_model(config).to(device)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise UsageError(f"--ckpt {args.ckpt}: weights do not fit {args.model} at --image_size {args.image_size} ({str(e).splitlines()[1].strip()})") from None
    model.eval()

    labels = [label for label in parse_labels(args.labels, args.num_classes) for _ in range(args.per_class)]
    latent_shape = (config["in_channels"], args.num_frames, config["input_size"], config["input_size"]) if args.use_video else (config["in_channels"], config["input_size"], config["input_size"])
    noise = torch.randn(len(labels), *latent_shape, device=device)  # drawn up front: DDIM / DPM-Solver samples do not depend on --batch_size
    outputs = []
    for start in range(0, len(labels), args.batch_size):
        y = torch.tensor(labels[start : start + args.batch_size], device=device)
        latents = denoise(args, model, noise[start : start + args.batch_size], y)
        outputs.append(vae.decode(latents).clamp(-1, 1).cpu())
    samples = torch.cat(outputs)

    from opendit.utils.media import save_image, save_image_grid, save_video

    os.makedirs(args.output, exist_ok=True)
    files = []
    for i, (x, label) in enumerate(zip(samples, labels)):
        if args.use_video:
            files.append(save_video(x, os.path.join(args.output, f"{i:04d}-class{label}.mp4"), fps=args.fps))
        else:
            files.append(save_image(x, os.path.join(args.output, f"{i:04d}-class{label}.png")))
    if not args.use_video:
        files.append(save_image_grid(samples, os.path.join(args.output, "grid.png"), nrow=max(args.per_class, 4) if args.per_class > 1 else 4))
    print(f"Saved {len(samples)} samples to {args.output}")
    result = {"files": files, "labels": labels}
    if args.check_fidelity:
        result.update(check_fidelity(samples, labels, args.use_video, args.output))
    return result


def check_fidelity(samples: torch.Tensor, labels: list, use_video: bool, output: str) -> dict:
    """Score samples with the shapes checker (it reads the pixels only) and write fidelity.json."""
    from opendit.data.checker import ClassFidelityChecker
    from opendit.data.shapes import SHAPE_CLASSES

    if max(labels) >= len(SHAPE_CLASSES):
        raise UsageError(f"--check_fidelity: labels must be shapes classes (0..{len(SHAPE_CLASSES) - 1})")
    checker = ClassFidelityChecker(num_classes=len(SHAPE_CLASSES))
    y = torch.tensor(labels)
    if use_video:
        extra = checker.score_video(samples, y)  # accuracy, frame_accuracy, motion_fraction
        score = extra["accuracy"]
    else:
        score = checker.score(samples, y)
        extra = {"per_class": checker.per_class(samples, y)}
    right = round(score * len(labels))
    print(f"class fidelity: {100 * score:.1f}% ({right}/{len(labels)} samples recognised as their class)")
    result = {"fidelity": score, **extra}
    with open(os.path.join(output, "fidelity.json"), "w") as f:
        json.dump(result, f, indent=2, default=str)
    return result


def main(argv: Optional[list] = None) -> dict:
    args = get_parser().parse_args(argv)
    try:
        return sample(args)
    except (UsageError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
