"""`python sample.py` end to end, wall clock by part, as a markdown table (issue 15's "outside the loop").

    python bench/sample_wall.py [--variants eager,fast,float8] [--runs 2] [--steps 250] [--tiny]

Writes a random DiT-XL/2 checkpoint (model.safetensors, fp32) and a random VAE folder with sd-vae-ft-ema's
architecture (in diffusers' format), then runs sample.py on them as a user would (8 of DiT's classes, cfg 4, 250 DDPM
steps) in a fresh interpreter, --runs times per variant, each variant with its own empty inductor cache (run 1
compiles cold, later runs hit the cache). A run's parts are timed inside it by wrapping sample.py's calls: interpreter
start, imports (torch and sample.py's), creating the CUDA context (which the VAE's .to(device) would do first),
checkpoint read, VAE build + weights, model build (the weights loaded, --compile's wrapping), the denoising call (its
first call: compile + capture + the loop), VAE decode, writing the PNGs, and the exit (after run_script's os._exit,
as sample.py ends). "outside" is the wall clock less the denoising call; the loop alone is bench/sample.py's.
--tiny: DiT-S/2 at 64 with a tiny VAE on the CPU, 5 steps (a smoke check of the script).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
VARIANTS = {  # name -> sample.py flags
    "eager": [],
    "fast": ["--enable_flashattn", "--compile"],
    "float8": ["--enable_flashattn", "--compile", "--float8"],
}
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=256, scaling_factor=0.18215)
PARTS = ["start", "imports", "CUDA init", "read checkpoint", "load VAE", "build model", "denoise", "VAE decode", "write files", "exit"]


def child(report: str, launched: float, argv: list) -> None:
    """Run sample.py's main(argv) with its parts timed; write {part: seconds} to report."""
    times = dict.fromkeys(PARTS, 0.0)
    times["start"] = time.time() - launched  # interpreter start
    start = time.perf_counter()
    import torch

    import opendit.sampling.sample as sample
    import opendit.utils.media as media
    from opendit.parallel.process import run_script

    times["imports"] = time.perf_counter() - start
    start = time.perf_counter()
    if torch.cuda.is_available() and "cpu" not in argv:  # the CUDA context, which the VAE's .to(device) would create
        torch.empty(1, device="cuda")
    times["CUDA init"] = time.perf_counter() - start

    def timed(part, fn, sync=False):
        def wrapper(*args, **kw):
            t = time.perf_counter()
            out = fn(*args, **kw)
            if sync and torch.cuda.is_available():
                torch.cuda.synchronize()
            times[part] += time.perf_counter() - t
            return out

        return wrapper

    def load_vae(*args, **kw):
        vae = load(*args, **kw)
        vae.decode = timed("VAE decode", vae.decode, sync=True)
        return vae

    load = timed("load VAE", sample.load_vae, sync=True)
    sample.load_vae = load_vae
    sample.load_model_weights = timed("read checkpoint", sample.load_model_weights)
    build_model, speed_up = sample.build_sampling_model, sample.speed_up
    sample.build_sampling_model = timed("build model", build_model, sync=True)
    sample.speed_up = timed("build model", speed_up, sync=True)
    sample.denoise = timed("denoise", sample.denoise, sync=True)
    media.save_image = timed("write files", media.save_image)
    media.save_image_grid = timed("write files", media.save_image_grid)

    def main():
        sample.main(argv)
        with open(report, "w") as f:
            json.dump({**times, "done": time.time()}, f)

    run_script(main)  # as sample.py ends


def write_inputs(folder: str, tiny: bool) -> tuple:
    """(checkpoint path, VAE folder): random weights of the benchmarked model and VAE."""
    import torch
    from safetensors.torch import save_file

    from opendit.encoders.vae import TINY_CONFIG, VAE
    from opendit.models import DiT_models

    torch.manual_seed(0)
    model = DiT_models["DiT-S/2" if tiny else "DiT-XL/2"](input_size=32, num_classes=1000)  # tiny VAE: 64 px / 2; SD VAE: 256 px / 8
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)  # adaLN-Zero init would zero every block
    ckpt = os.path.join(folder, "model.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ckpt)
    vae_dir = os.path.join(folder, "vae")
    VAE.from_config(TINY_CONFIG if tiny else SD_VAE).model.save_pretrained(vae_dir)
    return ckpt, vae_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", type=str, default="eager,fast,float8", help=f"comma-separated: {', '.join(VARIANTS)}")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--child", type=str, nargs=2, default=None, help=argparse.SUPPRESS)  # REPORT LAUNCH_TIME
    opts, rest = parser.parse_known_args()
    if opts.child:
        return child(opts.child[0], float(opts.child[1]), rest)
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, vae_dir = write_inputs(tmp, opts.tiny)
        model = ["--model", "DiT-S/2", "--image_size", "64", "--device", "cpu"] if opts.tiny else ["--model", "DiT-XL/2", "--image_size", "256"]
        base = [*model, "--ckpt", ckpt, "--vae", vae_dir, "--num_sampling_steps", str(5 if opts.tiny else opts.steps), "--output", os.path.join(tmp, "out"),
                "--overwrite"]  # every run writes the same folder
        print(f"# python sample.py end to end, {gpu}, torch {torch.__version__}, {'DiT-S/2 at 64' if opts.tiny else 'DiT-XL/2 at 256'}, 8 images, cfg 4\n")
        print("| variant | run | wall | " + " | ".join(PARTS) + " | unaccounted | outside the loop |")
        print("|---|---:|---:|" + "---:|" * len(PARTS) + "---:|---:|")
        for name in opts.variants.split(","):
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": os.path.join(tmp, f"inductor-{name}")}  # run 1 cold, then warm
            for run in range(1, opts.runs + 1):
                report = os.path.join(tmp, "report.json")
                start = time.time()
                done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", report, str(start), *base, *VARIANTS[name]], cwd=ROOT, env=env, capture_output=True, text=True)
                end = time.time()
                wall = end - start
                if done.returncode != 0:
                    print(f"| {name} | {run} | failed (rc {done.returncode}): {done.stderr.strip().splitlines()[-1:]} |", flush=True)
                    break
                with open(report) as f:
                    times = json.load(f)
                times["exit"] = end - times.pop("done")  # exit handlers, the compile workers, the CUDA context
                print(f"| {name} | {run} | {wall:.2f} | " + " | ".join(f"{times[p]:.2f}" for p in PARTS) + f" | {wall - sum(times.values()):.2f} | {wall - times['denoise']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
