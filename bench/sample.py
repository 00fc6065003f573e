"""One-GPU sampling speed of DiT-XL/2 at 256 (random weights), as markdown tables.

    python bench/sample.py [--steps 250] [--images 8] [--ddp_batches 64,256] [--tiny] [--sections loop,outside,whole,broadcast,profile,imports]

1. The denoising loop for --images images with classifier-free guidance (2 x images rows per forward), 250 DDPM
   steps, per speed-up (cumulative): fp32 (the reference loop, what sample.py did), bf16 autocast (the engine),
   + fused attention (--enable_flashattn), + fused adaLN kernels (--enable_modulate_kernel), + --compile (per-block
   torch.compile and the whole step as one CUDA graph); then the whole model compiled (sample.py's default scope on
   one process), + the bf16 weights stored once, + each MLP's GELU in its fc1 GEMM's epilogue (both what sample.py
   does in bf16 on a GPU), + a bf16 residual stream (a probe); the fast path with --float8 (qkv and MLP GEMMs in
   float8 e4m3, fc1's GELU and fc2's row quantization one Triton pass) with fp32 accumulation, with fast accumulation
   (what the flag does), with fp32 accumulation and attention's proj in float8 too, and bf16 eager with --float8; and
   sample.py's --cuda_graph without compiling (fused attention and adaLN kernels, bf16 weights, GELU epilogue); and
   the fast path with each step computing its adaLN modulations (the engine before it precomputed them for the
   schedule's steps at once, opendit/sampling/engine.py), the fast path with the step's tail (guidance + update) eager
   (before --compile compiled it), --float8 with both as before, and --float8 with --bf16_residual.
   Then DDIM-50 and DPM-Solver-20, eager bf16 and the fastest path; and the drift of the --float8 rows: PSNR of their
   DDIM-50 latents against the bf16 fast path's and the fp32 loop's from the same noise.
2. sample_ddp.py throughput: images/s per GPU at each batch (cfg 1.5, 250 DDPM steps, from 25 timed steps).
3. Outside the loop: importing sample.py, building the model on the GPU, loading a safetensors checkpoint, writing
   8 PNGs, and the first call's compile + capture. The VAE and the whole run: bench/sample_wall.py.
4. whole: the full fast path with the whole model compiled (--compile_scope model, sample.py's default on one
   process) instead of each block, with and without the fused adaLN kernels, and DDIM-50 / DPM-Solver-20 with it.
5. broadcast: --attention_broadcast on Latte-XL/1x2x2 and VDiT-XL/1x2x2 at 16 frames x 256 px (latent 16x32x32),
   one video + CFG, DDIM-50, bf16 + fused attention, bf16 weights and the GELU epilogue (as sample.py): full attention
   vs each setting of BROADCASTS: eager, eager replayed as CUDA graphs (--cuda_graph: one graph per compute/reuse
   pattern), that with the fused adaLN kernels, then full attention on sample.py's fastest full path (whole model
   compiled, the step one CUDA graph). Speed-ups are against the full-attention row of the same run mode.
   BENCH_COMPILED_BLOCKS=1 adds each block compiled around the broadcast (measured slower; sample.py refuses
   --compile with --attention_broadcast).
6. imports: `python -X importtime -c "import opendit.sampling.sample"` in a fresh interpreter: total and the slowest.
7. profile: the top CUDA kernels of sample.py's fast path (whole model compiled, bf16 weights, GELU epilogue; or the
   variants --profile names), one step run from Python (not in a graph) under torch.profiler.
A loop's time is its second call (the first one compiles and captures). Default sections: loop,outside.
"""
import argparse
import math
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from opendit.kernels.float8 import to_float8  # noqa: E402
from opendit.models import DiT_models  # noqa: E402
from opendit.sampling import engine as engine_module  # noqa: E402
from opendit.sampling.denoise import _ENGINES, denoise  # noqa: E402
from opendit.sampling.sample import FLOAT8_FAST_ACCUM, add_broadcast_flags, cast_matmul_weights, speed_up  # noqa: E402

VARIANTS = {  # name -> (precision, flash attention, fused kernels, compile, extra: compile_scope / cast / bf16_residual)
    "fp32 + TF32 (reference loop, sample.py before)": ("fp32", False, False, False, ()),
    "bf16 autocast, engine (eager)": ("bf16", False, False, False, ()),
    "+ fused attention": ("bf16", True, False, False, ()),
    "+ fused adaLN kernels": ("bf16", True, True, False, ()),
    "+ compile per block, whole step as a CUDA graph": ("bf16", True, True, True, ()),
    "compile the whole model instead (no fused adaLN)": ("bf16", True, False, True, (("compile_scope", "model"),)),
    "+ bf16 weights stored once": ("bf16", True, False, True, (("compile_scope", "model"), ("cast", True))),
    "+ GELU in the fc1 GEMM's epilogue (sample.py's fast path)": ("bf16", True, False, True, (("compile_scope", "model"), ("cast", True), ("gelu_epilogue", True))),
    "+ bf16 residual stream (--bf16_residual)": ("bf16", True, False, True, (("compile_scope", "model"), ("cast", True), ("gelu_epilogue", True), ("bf16_residual", True))),
    "fast path + --float8, fp32 accumulation": ("bf16", True, False, True, (("compile_scope", "model"), ("cast", True), ("float8", True), ("fast_accum", False))),
    "fast path + --float8 (qkv / MLP GEMMs in float8 with fast accumulation, GELU + row quantize one Triton pass)":
        ("bf16", True, False, True, (("compile_scope", "model"), ("cast", True), ("float8", True))),
    "fast path + --float8, fp32 accumulation, attention's proj in float8 too": ("bf16", True, False, True, (("compile_scope", "model"), ("cast", True), ("float8", True), ("fast_accum", False), ("float8_proj", True))),
    "bf16 eager + fused attention + --float8": ("bf16", True, False, False, (("cast", True), ("float8", True))),
    "fused attention + fused adaLN + bf16 weights + GELU epilogue, CUDA graph, not compiled (--cuda_graph)":
        ("bf16", True, True, False, (("cast", True), ("gelu_epilogue", True), ("cuda_graph", True))),
    "the fast path with each step's adaLN modulations computed in its forward (before the precomputed table)":
        ("bf16", True, False, True, (("compile_scope", "model"), ("cast", True), ("gelu_epilogue", True), ("modulation_table", False))),
    "the fast path with the step's guidance and update eager (before the compiled tail)":
        ("bf16", True, False, True, (("compile_scope", "model"), ("cast", True), ("gelu_epilogue", True), ("compiled_tail", False))),
    "fast path + --float8 (fast accumulation) as in the sixth round (per-step modulations, eager tail)":
        ("bf16", True, False, True, (("compile_scope", "model"), ("cast", True), ("float8", True), ("modulation_table", False), ("compiled_tail", False))),
    "fast path + --float8 --bf16_residual": ("bf16", True, False, True, (("compile_scope", "model"), ("cast", True), ("float8", True), ("bf16_residual", True))),
}
FAST = "+ GELU in the fc1 GEMM's epilogue (sample.py's fast path)"
FP8 = "fast path + --float8, fp32 accumulation"
FP8_FAST = "fast path + --float8 (qkv / MLP GEMMs in float8 with fast accumulation, GELU + row quantize one Triton pass)"


def flags(precision, flash, kernels, compile, extra=(), **kw) -> argparse.Namespace:
    base = dict(sampler="ddpm", num_sampling_steps=250, noise_schedule="linear", cfg_scale=4.0, cfg_channels="3", num_classes=1000, vae="ema",
                mixed_precision=precision, enable_flashattn=flash, enable_modulate_kernel=kernels, compile=compile, gelu_epilogue=False)
    return argparse.Namespace(**{**base, **dict(extra), **kw})


def build(args, model_name: str, size: int, device) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.device(device):
        model = DiT_models[model_name](input_size=size // 8, num_classes=1000)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)  # adaLN-Zero init would zero every block
    model.kernels.low_precision_residual = getattr(args, "bf16_residual", False)
    if getattr(args, "float8", False):  # as sample.py: quantized from the fp32 weights, then the rest cast to bf16
        to_float8(model, fast_accum=getattr(args, "fast_accum", FLOAT8_FAST_ACCUM), skip=() if getattr(args, "float8_proj", False) else ("proj",))
    if getattr(args, "cast", False):
        cast_matmul_weights(model, torch.bfloat16)
    return speed_up(args, model.eval())


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_loop(args, model, n: int, latent: tuple, device) -> tuple:
    """(first call seconds, second call seconds) of denoise on n images."""
    times = []
    budget = engine_module.modulation_budget
    if not getattr(args, "modulation_table", True):  # the engine before the table: every step computes its modulations
        engine_module.modulation_budget = lambda device: 0
    try:
        for _ in range(2):
            z = torch.randn(n, *latent, device=device)
            y = torch.randint(0, 1000, (n,), device=device)
            sync()
            start = time.perf_counter()
            with torch.no_grad():
                denoise(args, model, z, y)
            sync()
            times.append(time.perf_counter() - start)
    finally:
        engine_module.modulation_budget = budget
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


def whole_model_rows(opts, model_name: str, size: int, latent: tuple, device) -> None:
    print(f"\n## Whole-model compile (--compile_scope model), {opts.images} images + CFG, bf16 + fused attention + CUDA graph\n")
    print("| kernels | sampler | seconds | first call |\n|---|---|---:|---:|")
    for kernels in (False, True):
        args = flags("bf16", True, kernels, True, compile_scope="model", num_sampling_steps=opts.steps)
        model = build(args, model_name, size, device)
        for sampler, steps in (("ddpm", opts.steps), ("ddim", 50), ("dpm-solver", 20)):
            args.sampler, args.num_sampling_steps = sampler, steps
            try:
                first, second = timed_loop(args, model, opts.images, latent, device)
            except Exception as e:
                print(f"| {kernels} | {sampler}-{steps} | failed: {type(e).__name__}: {str(e)[:200]} | |", flush=True)
                break
            print(f"| {'fused adaLN' if kernels else 'none'} | {sampler}-{steps} | {second:.2f} | {first:.1f} |", flush=True)
        _ENGINES.clear()
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


WIDE = ["--attention_broadcast", "--broadcast_range", "0.1,0.9", "--broadcast_every", "3", "--broadcast_range_temporal", "0.05,0.95", "--broadcast_every_temporal", "6"]
BROADCASTS = {  # name -> sample.py flags (also bench/sample_quality.py's rows)
    "full attention": [],
    "--attention_broadcast (defaults: spatial 0.2-0.8 every 2, temporal 0.1-0.9 every 4)": ["--attention_broadcast"],
    "wide: spatial 0.1-0.9 every 3, temporal 0.05-0.95 every 6": WIDE,
    "wide + MLPs 0.2-0.8 every 2": WIDE + ["--broadcast_mlp_range", "0.2,0.8", "--broadcast_mlp_every", "2"],
    "wide + MLPs 0.1-0.9 every 3": WIDE + ["--broadcast_mlp_range", "0.1,0.9", "--broadcast_mlp_every", "3"],
}


def broadcast_flags(flags: list) -> dict:
    """sample.py's broadcast flags -> the Namespace fields they set."""
    parser = argparse.ArgumentParser()
    add_broadcast_flags(parser)
    return vars(parser.parse_args(flags))


def broadcast_rows(opts, device) -> None:
    from opendit.models import Video_models

    frames, size, steps = (4, 32, 10) if opts.tiny else (16, 256, 50)
    print(f"\n## Attention broadcast, 1 video + CFG (2 rows), {frames} frames at {size} px, DDIM-{steps}, bf16{'' if opts.tiny else ' + fused attention'}, bf16 weights, GELU epilogue\n")
    print("| model | attention | run | seconds | speed-up | forwards (attention + MLP) computed / reused |\n|---|---|---|---:|---:|---:|")
    modes = ("eager",) if device.type != "cuda" else ("eager", "CUDA graphs", "fused adaLN + CUDA graphs", "whole model + CUDA graph")
    modes += ("compile per block",) if os.environ.get("BENCH_COMPILED_BLOCKS") else ()
    for name in (("Latte-S/1x2x2", "VDiT-S/1x2x2") if opts.tiny else ("Latte-XL/1x2x2", "VDiT-XL/1x2x2")):
        for mode in modes:  # a fresh model per mode: compiling is in place
            torch.manual_seed(0)
            with torch.device(device):
                model = Video_models[name](input_size=size // 8, num_frames=frames, num_classes=1000, **(dict(depth=2) if opts.tiny else {}))
            with torch.no_grad():
                for p in model.parameters():
                    p.normal_(0, 0.02)
            cast_matmul_weights(model, torch.bfloat16)  # as sample.py stores them in bf16
            base = None
            for label, b in BROADCASTS.items():
                if mode == "whole model + CUDA graph" and b:
                    break  # sample.py refuses --compile with the broadcast: this mode times full attention, the fastest full path
                compile = mode in ("compile per block", "whole model + CUDA graph")
                args = flags("bf16", not opts.tiny, mode.startswith("fused"), compile, sampler="ddim", num_sampling_steps=steps, use_video=True, gelu_epilogue=True,
                             compile_scope="model" if mode.startswith("whole") else "blocks", cuda_graph=mode.endswith("CUDA graphs"), **broadcast_flags(b))
                speed_up(args, model.eval())
                try:
                    _, second = timed_loop(args, model, 1, (4, frames, size // 8, size // 8), device)
                except Exception as e:
                    print(f"| {name} | {label} | {mode} | failed: {type(e).__name__}: {str(e)[:200]} | | |", flush=True)
                    break
                base = base or second
                engine = next(iter(_ENGINES.values()))
                counts = f"{engine.broadcast.computed} / {engine.broadcast.reused}" if engine.broadcast is not None else "-"
                print(f"| {name} | {label} | {mode} | {second:.3f} | {base / second:.2f}x | {counts} |", flush=True)
                _ENGINES.clear()
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()


def drift_rows(models: dict, fast: tuple, n: int, latent: tuple, device) -> None:
    """PSNR of DDIM-50 latents (cfg 4, the same noise and labels) of each float8 variant against the bf16 fast path
    and, when it ran, the fp32 reference loop (random weights: a measure of numerical drift, not of image quality)."""
    fp32 = VARIANTS["fp32 + TF32 (reference loop, sample.py before)"]
    refs = {name: v for name, v in (("bf16 fast path", fast), ("fp32", fp32)) if v in models}
    tests = {name: v for name, v in VARIANTS.items() if ("float8", True) in v[4] and v in models}
    if not tests or not refs:
        return
    z = torch.randn(n, *latent, generator=torch.Generator().manual_seed(3)).to(device)
    y = torch.arange(n, device=device) * 7
    out = {}
    for name, v in {**refs, **tests}.items():
        args = flags(*v, sampler="ddim", num_sampling_steps=50)
        torch.manual_seed(0)
        with torch.no_grad():
            out[name] = denoise(args, models[v], z, y).float()
        _ENGINES.clear()
    print(f"\n## Drift of --float8, DDIM-50, {n} images + CFG from the same noise: PSNR of the latents (dB, peak-to-peak of the reference)\n")
    print("| variant | " + " | ".join(f"vs {r}" for r in refs) + " |\n|---|" + "---:|" * len(refs))
    for name in ({"bf16 fast path": fast} if "fp32" in refs else {}) | tests:
        cells = []
        for r in refs:
            peak = (out[r].amax() - out[r].amin()).item()
            cells.append("-" if r == name else f"{10 * math.log10(peak ** 2 / (out[name] - out[r]).square().mean().clamp_min(1e-20).item()):.1f}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


PROFILES = {"fast": FAST, "fp8": FP8, "fp8-fast": FP8_FAST, "fp8-eager": "bf16 eager + fused attention + --float8"}


def profile_rows(opts, model_name: str, size: int, latent: tuple, device) -> None:
    from torch.profiler import ProfilerActivity, profile

    for key in opts.profile.split(","):
        args = flags(*VARIANTS[PROFILES[key]], num_sampling_steps=opts.steps)
        model = build(args, model_name, size, device)
        timed_loop(args, model, opts.images, latent, device)  # compile
        engine = next(iter(_ENGINES.values()))
        x, t, c, noise, x0 = engine.bufs if engine.cuda_graph else (torch.randn(opts.images, *latent, device=device), engine.s.timesteps[0], engine.s.coefs[0],
                                                                      torch.randn(opts.images, *latent, device=device), torch.zeros(opts.images, *latent, device=device))
        with torch.no_grad():
            for _ in range(3):
                engine.step(x, t, c, noise, x0)
            sync()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    engine.step(x, t, c, noise, x0)
                sync()
        print(f"\n## Profile of {PROFILES[key]}, {opts.images} images + CFG, 5 steps (not graphed)\n")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=90), flush=True)
        _ENGINES.clear()
        del model


def import_rows() -> None:
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    env = dict(os.environ, PYTHONPATH=root)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", "import opendit.sampling.sample"], cwd=root, env=env, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    rows = [line.split("|") for line in done.stderr.splitlines() if line.startswith("import time:") and "self [us]" not in line]
    rows = [(int(r[1]), r[2].rstrip()) for r in rows]  # (cumulative us, indented name)
    top = [(us, name.strip()) for us, name in rows if len(name) - len(name.lstrip()) <= 3]  # top-level imports
    print("\n## Imports: python -X importtime -c 'import opendit.sampling.sample' (fresh interpreter)\n")
    print(f"wall {wall:.2f} s (interpreter start included); importtime total {rows[-1][0] / 1e6:.2f} s\n")
    print("| top-level module | cumulative seconds |\n|---|---:|")
    for us, name in sorted(top, reverse=True)[:10]:
        print(f"| {name} | {us / 1e6:.2f} |")
    loaded = subprocess.run([sys.executable, "-c", "import sys, opendit.sampling.sample; print(' '.join(m for m in ('diffusers', 'transformers', 'av', 'pandas', 'triton', 'torchvision', 'torch.distributed.tensor', 'torch.distributed.fsdp', 'torch._dynamo') if m in sys.modules))"],
                            cwd=root, env=env, capture_output=True, text=True, check=True).stdout.strip()
    print(f"\nheavy modules loaded by the import: {loaded or 'none'}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--ddp_batches", type=str, default="64,256")
    parser.add_argument("--rows", type=str, default="", help="comma-separated indices of the loop's variants to run (0 = fp32; default all)")
    parser.add_argument("--profile", type=str, default="fast", help=f"comma-separated variants the profile section profiles: {', '.join(PROFILES)}")
    parser.add_argument("--tiny", action="store_true", help="DiT-S/2 at 64 on the CPU, bf16 only: a smoke check of the script")
    parser.add_argument("--sections", type=str, default="loop,outside", help="comma-separated: loop (with samplers and ddp), outside, whole, broadcast, profile, imports")
    opts = parser.parse_args()
    sections = set(opts.sections.split(","))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    model_name, size = ("DiT-S/2", 64) if opts.tiny else ("DiT-XL/2", 256)
    latent = (4, size // 8, size // 8)
    variants = {k: v for k, v in VARIANTS.items() if not opts.tiny or not (v[1] or v[2] or v[3] or ("float8", True) in v[4])}
    if opts.rows:  # always with bf16 eager (the baseline of the ddp rows)
        keep = {int(i) for i in opts.rows.split(",")} | {1}
        variants = {k: v for i, (k, v) in enumerate(variants.items()) if i in keep}
    print(f"# {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, torch {torch.__version__}, {model_name} at {size}\n")

    if "loop" in sections:
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
        eager = VARIANTS["bf16 autocast, engine (eager)"]
        bf16 = [v for v in models if v[0] == "bf16" and ("float8", True) not in v[4]]  # bf16 eager always ran
        fast = VARIANTS[FAST] if VARIANTS[FAST] in models else max(bf16, key=lambda v: sum(v[1:4]))  # sample.py's bf16 fast path, or the most on

        print(f"\n## Other samplers, {opts.images} images + CFG\n")
        print("| sampler | variant | seconds |\n|---|---|---:|")
        for sampler, steps in (("ddim", 50), ("dpm-solver", 20)):
            for v in dict.fromkeys((eager, fast)):
                args = flags(*v, sampler=sampler, num_sampling_steps=steps)
                try:
                    _, second = timed_loop(args, models[v], opts.images, latent, device)
                except Exception as e:
                    print(f"| {sampler}-{steps} | failed: {type(e).__name__}: {str(e)[:200]} | |", flush=True)
                    continue
                print(f"| {sampler}-{steps} | {'full fast path' if v[3] else 'bf16 eager'} | {second:.2f} |", flush=True)

        drift_rows(models, fast, opts.images, latent, device)

        print("\n## sample_ddp.py throughput per GPU (cfg 1.5, 250 DDPM steps; 25 timed steps x 10)\n")
        fp8 = {label: VARIANTS[k] for k, label in ((FP8, "--float8, fp32 accum"), (FP8_FAST, "--float8 (fast accum)")) if VARIANTS[k] in models}
        ddp = [eager, fast, *fp8.values()]
        print("| batch | bf16 eager img/s | full fast path img/s | speed-up |" + "".join(f" {label} img/s | speed-up |" for label in fp8))
        print("|---|---:|---:|---:|" + "---:|---:|" * len(fp8))
        for batch in [int(b) for b in opts.ddp_batches.split(",") if b]:  # --ddp_batches "": none
            rate = {}
            for v in dict.fromkeys(ddp):  # each variant once (fast is eager when nothing faster ran)
                args = flags(*v, cfg_scale=1.5, num_sampling_steps=25)
                try:
                    _, second = timed_loop(args, models[v], batch, latent, device)
                except Exception as e:
                    print(f"batch {batch} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    second = float("nan")
                rate[v] = batch / (second * 10)
                _ENGINES.clear()
            rates = [rate[v] for v in ddp]
            print(f"| {batch} | {rates[0]:.1f} | " + " | ".join(f"{r:.1f} | {r / rates[0]:.2f}x" for r in rates[1:]) + " |", flush=True)

    if "outside" in sections:
        print("\n## Outside the loop\n")
        print("| part | seconds |\n|---|---:|")
        for part, seconds in outside_the_loop(model_name, size, device):
            print(f"| {part} | {seconds:.2f} |", flush=True)
    if "broadcast" in sections:
        broadcast_rows(opts, device)
    if "imports" in sections:
        import_rows()
    if "profile" in sections and device.type == "cuda":
        profile_rows(opts, model_name, size, latent, device)
    if "whole" in sections and device.type == "cuda":
        whole_model_rows(opts, model_name, size, latent, device)


if __name__ == "__main__":
    main()
