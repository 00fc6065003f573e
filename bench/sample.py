"""One-GPU sampling speed of DiT-XL/2 at 256 (random weights), as markdown tables.

    python bench/sample.py [--steps 250] [--images 8] [--ddp_batches 64,256] [--tiny]

1. The denoising loop for --images images with classifier-free guidance (2 x images rows per forward), 250 DDPM
   steps, per speed-up (cumulative): fp32 (the reference loop, what sample.py did), bf16 autocast (the engine),
   + fused attention (--enable_flashattn), + fused adaLN kernels (--enable_modulate_kernel), + --compile (per-block
   torch.compile and the whole step as one CUDA graph). Then DDIM-50 and DPM-Solver-20, eager bf16 and full path.
2. sample_ddp.py throughput: images/s per GPU at each batch (cfg 1.5, 250 DDPM steps, from 25 timed steps).
3. Outside the loop: importing sample.py, building the model on the GPU, loading a safetensors checkpoint, writing
   8 PNGs, and the first call's compile + capture. The SD VAE decode is not measured (no diffusers on the host).
A loop's time is its second call (the first one compiles and captures).
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from opendit.models import DiT_models  # noqa: E402
from opendit.sampling.denoise import _ENGINES, denoise  # noqa: E402
from opendit.sampling.sample import speed_up  # noqa: E402

VARIANTS = {  # name -> (precision, flash attention, fused kernels, compile)
    "fp32 + TF32 (reference loop, sample.py before)": ("fp32", False, False, False),
    "bf16 autocast, engine (eager)": ("bf16", False, False, False),
    "+ fused attention": ("bf16", True, False, False),
    "+ fused adaLN kernels": ("bf16", True, True, False),
    "+ compile, whole step as a CUDA graph (full fast path)": ("bf16", True, True, True),
}


def flags(precision, flash, kernels, compile, **kw) -> argparse.Namespace:
    base = dict(sampler="ddpm", num_sampling_steps=250, noise_schedule="linear", cfg_scale=4.0, cfg_channels="3", num_classes=1000, vae="ema",
                mixed_precision=precision, enable_flashattn=flash, enable_modulate_kernel=kernels, compile=compile)
    return argparse.Namespace(**{**base, **kw})


def build(args, model_name: str, size: int, device) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.device(device):
        model = DiT_models[model_name](input_size=size // 8, num_classes=1000)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)  # adaLN-Zero init would zero every block
    return speed_up(args, model.eval())


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_loop(args, model, n: int, latent: tuple, device) -> tuple:
    """(first call seconds, second call seconds) of denoise on n images."""
    times = []
    for _ in range(2):
        z = torch.randn(n, *latent, device=device)
        y = torch.randint(0, 1000, (n,), device=device)
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            denoise(args, model, z, y)
        sync()
        times.append(time.perf_counter() - start)
    return times[0], times[1]


def outside_the_loop(model_name: str, size: int, device) -> list:
    """Seconds of what sample.py does besides the loop (no VAE: see the module docstring)."""
    from safetensors.torch import save_file

    from opendit.checkpoint.weights import load_model_weights
    from opendit.utils.media import save_image

    rows = []
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import opendit.sampling.sample"], check=True, cwd=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    rows.append(("python -c 'import opendit.sampling.sample' (fresh interpreter, incl. torch)", time.perf_counter() - start))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        with torch.device(device):
            model = DiT_models[model_name](input_size=size // 8, num_classes=1000)
        sync()
        rows.append(("build the model on the GPU", time.perf_counter() - start))
        path = os.path.join(tmp, "model.safetensors")
        save_file({k: v.contiguous().cpu() for k, v in model.state_dict().items()}, path)
        start = time.perf_counter()
        state_dict, _ = load_model_weights(path)
        model.load_state_dict(state_dict)
        sync()
        rows.append(("load a safetensors checkpoint (fp32) into it", time.perf_counter() - start))
        images = torch.rand(8, 3, size, size) * 2 - 1
        start = time.perf_counter()
        for i, x in enumerate(images):
            save_image(x, os.path.join(tmp, f"{i}.png"))
        rows.append(("write 8 PNGs", time.perf_counter() - start))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--ddp_batches", type=str, default="64,256")
    parser.add_argument("--tiny", action="store_true", help="DiT-S/2 at 64 on the CPU, bf16 only: a smoke check of the script")
    opts = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    model_name, size = ("DiT-S/2", 64) if opts.tiny else ("DiT-XL/2", 256)
    latent = (4, size // 8, size // 8)
    variants = {k: v for k, v in VARIANTS.items() if not opts.tiny or not (v[1] or v[2] or v[3])}
    print(f"# {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, torch {torch.__version__}, {model_name} at {size}\n")

    print(f"## {opts.steps} DDPM steps, {opts.images} images + CFG ({2 * opts.images} rows a step), the loop only\n")
    print("| variant | seconds | first call (compile + capture) |\n|---|---:|---:|")
    models = {}
    for name, v in variants.items():
        args = flags(*v, num_sampling_steps=opts.steps)
        model = build(args, model_name, size, device)
        try:
            first, second = timed_loop(args, model, opts.images, latent, device)
        except Exception as e:  # report and go on: one failing speed-up should not cost the other rows
            print(f"| {name} | failed: {type(e).__name__}: {str(e)[:200]} | |", flush=True)
            continue
        print(f"| {name} | {second:.2f} | {first:.2f} |", flush=True)
        models[v] = model
        _ENGINES.clear()
    fast = list(variants.values())[-1] if list(variants.values())[-1] in models else max(models, key=lambda v: sum(v[1:]))  # everything on

    print(f"\n## Other samplers, {opts.images} images + CFG\n")
    print("| sampler | variant | seconds |\n|---|---|---:|")
    for sampler, steps in (("ddim", 50), ("dpm-solver", 20)):
        for v in (VARIANTS["bf16 autocast, engine (eager)"], fast):
            if v not in models:
                continue
            args = flags(*v, sampler=sampler, num_sampling_steps=steps)
            try:
                _, second = timed_loop(args, models[v], opts.images, latent, device)
            except Exception as e:
                print(f"| {sampler}-{steps} | failed: {type(e).__name__}: {str(e)[:200]} | |", flush=True)
                continue
            print(f"| {sampler}-{steps} | {'full fast path' if v[3] else 'bf16 eager'} | {second:.2f} |", flush=True)

    print("\n## sample_ddp.py throughput per GPU (cfg 1.5, 250 DDPM steps; 25 timed steps x 10)\n")
    print("| batch | bf16 eager img/s | full fast path img/s | speed-up |\n|---|---:|---:|---:|")
    for batch in [int(b) for b in opts.ddp_batches.split(",")]:
        rates = []
        for v in (VARIANTS["bf16 autocast, engine (eager)"], fast):
            args = flags(*v, cfg_scale=1.5, num_sampling_steps=25)
            try:
                _, second = timed_loop(args, models[v], batch, latent, device)
            except Exception as e:
                print(f"batch {batch} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                second = float("nan")
            rates.append(batch / (second * 10))
            _ENGINES.clear()
        print(f"| {batch} | {rates[0]:.1f} | {rates[1]:.1f} | {rates[1] / rates[0]:.2f}x |", flush=True)

    print("\n## Outside the loop\n")
    print("| part | seconds |\n|---|---:|")
    for part, seconds in outside_the_loop(model_name, size, device):
        print(f"| {part} | {seconds:.2f} |", flush=True)


if __name__ == "__main__":
    main()
