"""Quality kept by the fast sampling paths, on the CPU with small models trained on the built-in shapes.

    python bench/sample_quality.py [--workdir /tmp/opendit-quality] [--image_steps 400] [--video_steps 300] [--per_class 4]

1. Image model (DiT, 16 px, no VAE): DDIM-50 from the same noise in fp32 (the reference loop) and in bf16 autocast
   (the engine, what a GPU runs by default): PSNR of bf16 vs fp32, and the shapes checker's class fidelity of each.
2. Video model (VDiT, depth 2, width 64, 4 frames at 16 px): DDIM-50 with and without --attention_broadcast (default ranges) from the
   same noise: PSNR, the video checker's clip accuracy of each, and the loop's seconds.
Trained models are kept under --workdir and reused by the next run.
"""
import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from opendit.builders import model_config  # noqa: E402
from opendit.checkpoint.weights import load_model_weights  # noqa: E402
from opendit.data.checker import ClassFidelityChecker  # noqa: E402
from opendit.encoders import load_vae  # noqa: E402
from opendit.sampling import sample as sample_cli  # noqa: E402
from opendit.sampling.denoise import _ENGINES, denoise  # noqa: E402
from opendit.training import train as train_cli  # noqa: E402

COMMON = dict(depth=4, hidden_size=128, num_heads=4, image_size=16, lr=4e-3, noise_schedule="squaredcos_cap_v2", ema_decay=0.995, dataset="shapes",
              vae="none", num_classes=8, mixed_precision="fp32", num_workers=1, log_every=100, ckpt_every=0)


def trained(workdir: str, name: str, flags: dict, video: bool) -> str:
    """The experiment folder of a model trained with flags (trained now unless workdir already holds one)."""
    out = os.path.join(workdir, name)
    done = [d for d in sorted(os.listdir(out)) if d[0].isdigit()] if os.path.isdir(out) else []
    if not done:
        argv = [item for k, v in {**flags, "outputs": out}.items() for item in (f"--{k}", str(v))] + (["--use_video"] if video else [])
        start = time.time()
        train_cli.main(argv)
        print(f"trained {name} in {time.time() - start:.0f} s", flush=True)
        done = [d for d in sorted(os.listdir(out)) if d[0].isdigit()]
    return os.path.join(out, done[-1])


def load(experiment: str, extra: list) -> tuple:
    """(model, args) as sample.py builds them from the experiment folder, on the CPU."""
    args = sample_cli.get_parser().parse_args(["--ckpt", experiment, "--device", "cpu", "--sampler", "ddim", "--num_sampling_steps", "50", *extra])
    state_dict, config = load_model_weights(experiment, use_ema=True)
    sample_cli.resolve_model_flags(args, config)
    vae = load_vae(args.vae, torch.device("cpu"))
    model = sample_cli.build_sampling_model(args, model_config(args, vae, None), state_dict, torch.device("cpu"))
    return model, args


def run(args, model, z, y) -> tuple:
    """(samples in [-1, 1], loop seconds) of one denoise call from the noise z."""
    _ENGINES.clear()
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.no_grad():
        out = denoise(args, model, z, y)
    return out.clamp(-1, 1), time.perf_counter() - start


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """dB over images in [-1, 1] (peak-to-peak 2)."""
    return 10 * math.log10(4.0 / (a - b).square().mean().clamp_min(1e-20).item())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/opendit-quality")
    parser.add_argument("--image_steps", type=int, default=400)
    parser.add_argument("--video_steps", type=int, default=300)
    parser.add_argument("--per_class", type=int, default=4)
    parser.add_argument("--skip_image", action="store_true")
    parser.add_argument("--skip_video", action="store_true")
    opts = parser.parse_args()
    torch.set_num_threads(2)
    checker = ClassFidelityChecker(num_classes=8)
    y = torch.arange(8).repeat_interleave(opts.per_class)

    if not opts.skip_image:
        exp = trained(opts.workdir, "image", dict(COMMON, model="DiT-S/2", batch_size=32, max_steps=opts.image_steps), video=False)
        model, args = load(exp, ["--cfg_scale", "4.0"])
        z = torch.randn(len(y), 3, 16, 16, generator=torch.Generator().manual_seed(1))
        rows = {}
        for precision in ("fp32", "bf16"):
            args.mixed_precision = precision
            rows[precision] = run(args, model, z, y)
        print(f"\n## Image model ({opts.image_steps} training steps), DDIM-50, cfg 4, {len(y)} samples, CPU\n")
        print("| precision | class fidelity | PSNR vs fp32 (dB) | loop seconds |\n|---|---:|---:|---:|")
        for precision, (x, sec) in rows.items():
            db = "-" if precision == "fp32" else f"{psnr(x, rows['fp32'][0]):.1f}"
            print(f"| {precision} | {100 * checker.score(x, y):.1f} | {db} | {sec:.2f} |", flush=True)

    if not opts.skip_video:
        exp = trained(opts.workdir, "video", dict(COMMON, model="VDiT-S/1x2x2", depth=2, hidden_size=64, num_frames=4, batch_size=8, max_steps=opts.video_steps), video=True)
        model, args = load(exp, ["--cfg_scale", "4.0", "--use_video"])
        z = torch.randn(len(y), 3, 4, 16, 16, generator=torch.Generator().manual_seed(2))
        rows = {}
        for name, flags in (("full", []), ("broadcast 0.2-0.8, every 2", ["--attention_broadcast"]), ("broadcast 0.1-0.9, every 3", ["--attention_broadcast", "--broadcast_range", "0.1,0.9", "--broadcast_every", "3"])):
            a = sample_cli.get_parser().parse_args(["--ckpt", exp, "--sampler", "ddim", "--num_sampling_steps", "50", "--cfg_scale", "4.0", *flags])
            sample_cli.resolve_model_flags(a, load_model_weights(exp)[1])
            a.mixed_precision = "fp32"
            rows[name] = run(a, model, z, y)
        print(f"\n## Video model VDiT depth 2 width 64 ({opts.video_steps} training steps), DDIM-50, cfg 4, {len(y)} clips of 4 frames, CPU fp32\n")
        print("| attention | clip accuracy | frame accuracy | PSNR vs full (dB) | loop seconds |\n|---|---:|---:|---:|---:|")
        for name, (x, sec) in rows.items():
            s = checker.score_video(x, y)
            db = "-" if name == "full" else f"{psnr(x, rows['full'][0]):.1f}"
            print(f"| {name} | {100 * s['accuracy']:.1f} | {100 * s['frame_accuracy']:.1f} | {db} | {sec:.2f} |", flush=True)


if __name__ == "__main__":
    main()
