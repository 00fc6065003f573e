"""Quality kept by the fast sampling paths, measured on the demo's own models (trained on the built-in shapes).

    python bench/sample_quality.py [--workdir /tmp/opendit-quality] [--per_class 16] [--skip_image] [--skip_video]

1. Image model: `make demo`'s recipe (DiT-S/2, depth 4, width 128, 16 px, 2000 steps). The demo's sampler (DDPM-100,
   cfg 4) in fp32 (the reference loop), bf16 (the engine, bf16 weights as sample.py stores them), bf16 with
   --bf16_residual (the residual stream in bf16 too) and, on a GPU,
   bf16 + --compile (the whole step as one CUDA graph), bf16 + --cuda_graph with the fused kernels (not compiled) and,
   on a GPU with float8 GEMMs, bf16 + --compile --float8 (fp32 and fast accumulation, and with --bf16_residual):
   the shapes checker's class fidelity of each; and DDIM-50 from the same noise: PSNR of each against fp32.
2. Video model: `make demo-video`'s recipe (VDiT-S/2x2x2, 4 frames at 16 px, Min-SNR-5, 3000 steps). The demo's
   sampler with full attention and with each --attention_broadcast setting of bench/sample.py (BROADCASTS), in the
   sample.py default precision of the device: the video checker's clip fidelity, PSNR against full attention from
   the same noise, the share of attention / MLP forwards reused and the loop's seconds; on a GPU also the widest
   setting replayed as CUDA graphs (--cuda_graph).
Trained models are kept under --workdir and reused by the next run. On a GPU the training takes a few minutes; on
two CPU cores about 15.
"""
import argparse
import importlib.util
import math
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
_spec = importlib.util.spec_from_file_location("bench_sample", os.path.join(HERE, "sample.py"))
bench_sample = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_sample)
BROADCASTS = bench_sample.BROADCASTS  # the settings bench/sample.py times

from opendit.builders import model_config  # noqa: E402
from opendit.checkpoint.weights import load_model_weights  # noqa: E402
from opendit.data.checker import ClassFidelityChecker  # noqa: E402
from opendit.demo import IMAGE_FLAGS, VIDEO_FLAGS, as_argv  # noqa: E402
from opendit.encoders import load_vae  # noqa: E402
from opendit.sampling import sample as sample_cli  # noqa: E402
from opendit.sampling.denoise import _ENGINES, denoise, wants_graph  # noqa: E402
from opendit.training import train as train_cli  # noqa: E402

TRAIN = dict(dataset="shapes", vae="none", num_classes=8, mixed_precision="fp32", log_every=500, ckpt_every=0)


def trained(workdir: str, name: str, flags: dict, video: bool, workers: int) -> str:
    """The experiment folder of a model trained with the demo's flags (trained now unless workdir holds one)."""
    out = os.path.join(workdir, name)
    done = [d for d in sorted(os.listdir(out)) if d[0].isdigit()] if os.path.isdir(out) else []
    if not done:
        start = time.time()
        train_cli.main(as_argv({**flags, **TRAIN, "num_workers": workers, "outputs": out}) + (["--use_video"] if video else []))
        print(f"trained {name} in {time.time() - start:.0f} s", flush=True)
        done = [d for d in sorted(os.listdir(out)) if d[0].isdigit()]
    return os.path.join(out, done[-1])


def load(experiment: str, device: torch.device, extra: list) -> tuple:
    """(model, args) as sample.py builds them from the experiment folder and the flags extra."""
    args = sample_cli.get_parser().parse_args(["--ckpt", experiment, "--cfg_scale", "4.0", *extra])
    state_dict, config = load_model_weights(experiment, use_ema=True)
    sample_cli.resolve_model_flags(args, config)
    sample_cli.resolve_speed_flags(args, device)
    vae = load_vae(args.vae, device)
    model = sample_cli.speed_up(args, sample_cli.build_sampling_model(args, model_config(args, vae, None), state_dict, device))
    return model, args


def run(args, model, z, y) -> tuple:
    """(samples in [-1, 1] on the CPU, loop seconds, engine) of one denoise call from the noise z (seeded stream)."""
    _ENGINES.clear()
    for _ in range(2 if wants_graph(args) else 1):  # the first call of a compiled / graphed path compiles and captures
        torch.manual_seed(0)
        if z.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            out = denoise(args, model, z, y)
        if z.is_cuda:
            torch.cuda.synchronize()
    engine = next(iter(_ENGINES.values()), None)
    return out.clamp(-1, 1).float().cpu(), time.perf_counter() - start, engine


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """dB over samples in [-1, 1] (peak-to-peak 2)."""
    return 10 * math.log10(4.0 / (a - b).square().mean().clamp_min(1e-20).item())


def image_rows(opts, device, checker) -> None:
    exp = trained(opts.workdir, "image", {**IMAGE_FLAGS, "max_steps": opts.train_steps or IMAGE_FLAGS["max_steps"]}, False, opts.workers)
    y = torch.arange(8).repeat_interleave(opts.per_class).to(device)
    z = torch.randn(len(y), 3, 16, 16, generator=torch.Generator().manual_seed(1)).to(device)
    variants = {"fp32 (reference loop)": ["--mixed_precision", "fp32"], "bf16 (engine, bf16 weights)": ["--mixed_precision", "bf16"],
                "bf16 + --bf16_residual": ["--mixed_precision", "bf16", "--bf16_residual"]}
    if device.type == "cuda":
        variants["bf16 + --compile (whole step, one CUDA graph)"] = ["--mixed_precision", "bf16", "--compile"]
        variants["bf16 + --cuda_graph + fused kernels (no compile)"] = ["--mixed_precision", "bf16", "--cuda_graph", "--enable_modulate_kernel", "--enable_flashattn"]
        if torch.cuda.get_device_capability(device) >= (8, 9):
            variants["bf16 + --compile --float8, fp32 accumulation"] = ["--mixed_precision", "bf16", "--compile", "--float8"]
            variants["bf16 + --compile --float8 (fast accumulation, as the flag)"] = ["--mixed_precision", "bf16", "--compile", "--float8"]
            variants["bf16 + --compile --float8 --bf16_residual"] = ["--mixed_precision", "bf16", "--compile", "--float8", "--bf16_residual"]
    if opts.rows:  # the fp32 reference always runs
        variants = {k: v for k, v in variants.items() if k.startswith("fp32") or any(part in k for part in opts.rows.split(","))}
    rows, fast_accum = {}, sample_cli.FLOAT8_FAST_ACCUM
    for name, flags in variants.items():
        sample_cli.FLOAT8_FAST_ACCUM = fast_accum and not name.endswith("fp32 accumulation")  # what --float8 builds with
        model, args = load(exp, device, flags)
        args.sampler, args.num_sampling_steps = "ddpm", 100
        fidelity = checker.score(run(args, model, z, y)[0], y.cpu())
        args.sampler, args.num_sampling_steps = "ddim", 50
        rows[name] = (fidelity, *run(args, model, z, y)[:2])
    sample_cli.FLOAT8_FAST_ACCUM = fast_accum
    print(f"\n## Image model, the demo's recipe, {len(y)} samples from the same noise, {device.type}\n")
    print("| precision | class fidelity (DDPM-100, cfg 4) | DDIM-50 PSNR vs fp32 (dB) | DDIM-50 loop seconds |\n|---|---:|---:|---:|")
    ref = rows["fp32 (reference loop)"][1]
    for name, (fidelity, x, sec) in rows.items():
        db = "-" if x is ref else f"{psnr(x, ref):.1f}"
        print(f"| {name} | {100 * fidelity:.1f}% | {db} | {sec:.2f} |", flush=True)


def video_rows(opts, device, checker) -> None:
    exp = trained(opts.workdir, "video", {**VIDEO_FLAGS, "max_steps": opts.train_steps or VIDEO_FLAGS["max_steps"]}, True, opts.workers)
    y = torch.arange(8).repeat_interleave(opts.per_class).to(device)
    z = torch.randn(len(y), 3, 4, 16, 16, generator=torch.Generator().manual_seed(2)).to(device)
    model, args = load(exp, device, ["--sampler", "ddpm", "--num_sampling_steps", "100"])
    train_config = load_model_weights(exp)[1]
    rows, settings = {}, dict(BROADCASTS)
    if device.type == "cuda":
        widest = list(BROADCASTS)[-1]
        settings[f"{widest}, --cuda_graph"] = BROADCASTS[widest] + ["--cuda_graph"]
    for name, flags in settings.items():
        a = sample_cli.get_parser().parse_args(["--ckpt", exp, "--sampler", "ddpm", "--num_sampling_steps", "100", "--cfg_scale", "4.0", *flags])
        sample_cli.resolve_model_flags(a, train_config)
        a.mixed_precision = args.mixed_precision
        rows[name] = run(a, model, z, y)
    print(f"\n## Video model, the demo-video recipe, DDPM-100, cfg 4, {len(y)} clips from the same noise, {args.mixed_precision} on {device.type}\n")
    print("| attention | clip fidelity | class alone | motion alone | PSNR vs full (dB) | forwards reused | loop seconds |\n|---|---:|---:|---:|---:|---:|---:|")
    ref = rows["full attention"][0]
    for name, (x, sec, engine) in rows.items():
        s = checker.score_video(x, y.cpu())
        b = engine.broadcast if engine is not None else None
        reused = f"{100 * b.reused / max(1, b.reused + b.computed):.0f}%" if b is not None else "-"
        db = "-" if x is ref else f"{psnr(x, ref):.1f}"
        print(f"| {name} | {100 * s['accuracy']:.1f}% | {100 * s['class_accuracy']:.1f}% | {100 * s['motion_accuracy']:.1f}% | {db} | {reused} | {sec:.2f} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/opendit-quality")
    parser.add_argument("--per_class", type=int, default=16, help="samples (clips) per class")
    parser.add_argument("--workers", type=int, default=1, help="data loader workers while training")
    parser.add_argument("--train_steps", type=int, default=None, help="override the demo recipes' training steps (a smoke run)")
    parser.add_argument("--rows", type=str, default="", help="image rows to run: comma-separated parts of their names (default: all)")
    parser.add_argument("--skip_image", action="store_true")
    parser.add_argument("--skip_video", action="store_true")
    opts = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    checker = ClassFidelityChecker(num_classes=8)
    if not opts.skip_image:
        image_rows(opts, device, checker)
    if not opts.skip_video:
        video_rows(opts, device, checker)


if __name__ == "__main__":
    main()
