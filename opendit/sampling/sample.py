"""Sample images (PNG grid + one file each) or videos (one mp4 each) from a trained DiT / VDiT, by class or prompt."""
import argparse
import math
import os
import re
from typing import Optional

import torch

from opendit.builders import PRECISIONS, build_model, check_model_flags, model_config
from opendit.checkpoint.weights import load_model_weights, weights_mismatch
from opendit.encoders import load_text_encoder, load_vae
from opendit.encoders.text import DEFAULT_TEXT_ENCODER
from opendit.errors import UsageError, run_or_exit
from opendit.sampling.conditions import (
    conditions,
    file_stem,
    prompt_classes,
    prompt_directions,
    read_prompts,
)
from opendit.sampling.denoise import SAMPLERS, check_steps, cuda_graph_on, denoise, wants_graph
from opendit.sampling.fidelity import check_fidelity, check_shapes_labels
from opendit.sampling.layout import SamplingLayout, build_layout
from opendit.utils.cli import USAGE, HelpFormatter, file_in_path, plural

# Flags that fall back to the checkpoint's training config when not given, then to these defaults.
MODEL_DEFAULTS = dict(model="DiT-XL/2", vae="ema", image_size=256, num_classes=1000, num_frames=16, noise_schedule="linear")
FLOAT8_FAST_ACCUM = True  # --float8: the scaled GEMMs with fast accumulation (measured faster at the same quality: docs/benchmarks.md)
# What sample.py writes into --output: NNNN-*.png / .mp4, grid.png and --check_fidelity's report (--overwrite removes these only).
OUTPUT_FILE = re.compile(r"\d{4,}-(class\d+|prompt\d+(-class\d+)?-[a-z0-9-]+)\.(png|mp4)|grid\.png|fidelity\.json")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, usage=USAGE)
    # OpenDiT's flags (Meta DiT's hyphenated spellings are aliases); model flags default to the checkpoint's training config, then to DiT-XL/2 at 256.
    parser.add_argument("--model", type=str, default=None, help=f"registry name (default: from the checkpoint, else {MODEL_DEFAULTS['model']})")
    parser.add_argument("--vae", type=str, default=None, help="ema | mse | none | PATH (default: from the checkpoint, else ema)")
    parser.add_argument("--image_size", "--image-size", type=int, default=None, help="image side in pixels (default: from the checkpoint, else 256)")
    parser.add_argument("--num_classes", "--num-classes", type=int, default=None, help="class-table size (default: from the checkpoint, else 1000)")
    parser.add_argument("--cfg_scale", "--cfg-scale", type=float, default=4.0, help="classifier-free guidance scale (<= 1: no guidance)")
    parser.add_argument("--num_sampling_steps", "--num-sampling-steps", type=int, default=250, help="denoising steps")
    parser.add_argument("--seed", type=int, default=0, help="the noise's seed: the same seed and flags give the same samples")
    parser.add_argument("--num_frames", type=int, default=None, help="frames per video (default: from the checkpoint, else 16)")
    parser.add_argument("--noise_schedule", type=str, default=None, choices=["linear", "squaredcos_cap_v2"], help="beta schedule (default: from the checkpoint, else linear)")
    parser.add_argument("--frame_interval", type=int, default=1, help="temporal stride the model was trained with (video)")
    parser.add_argument("--use_video", action="store_true", help="sample a video model (VDiT)")
    parser.add_argument("--text_encoder", type=str, default=None, help=f"CLIP text encoder of a text model (default: the checkpoint's, else {DEFAULT_TEXT_ENCODER})")
    parser.add_argument("--ckpt", type=str, required=True, help="checkpoint: this project's (step folder, experiment folder, export folder), an official DiT .pt, or .safetensors")
    # Additions.
    parser.add_argument("--sampler", type=str, default="ddpm", choices=SAMPLERS, help="ddpm, ddim (eta 0) or dpm-solver (DPM-Solver++ 2M)")
    parser.add_argument("--output", type=str, default="samples", help="output folder; refused when it holds an earlier run's samples, unless --overwrite")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run's files in --output (NNNN-*.png/mp4, grid.png, fidelity.json; nothing else)")
    parser.add_argument("--labels", type=str, default=None, help="comma-separated class labels, or 'all' "
                        "(default: DiT's 8 ImageNet classes for a 1000-class model, else the first min(num_classes, 10) classes)")
    parser.add_argument("--prompt", type=str, action="append", default=None, help="a prompt for a text-conditioned model; repeat the flag for several")
    parser.add_argument("--prompt_path", type=str, default=None, help="a text file of prompts, one per line (after any --prompt)")
    parser.add_argument("--per_class", type=int, default=1, help="samples per label (text models: per prompt and label)")
    parser.add_argument("--batch_size", type=int, default=64, help="samples per forward pass (before the CFG doubling)")
    parser.add_argument("--cfg_channels", type=str, default="3", choices=["3", "all"], help="channels guided: 3 as in DiT's published numbers, or all")
    parser.add_argument("--use_model", action="store_true", help="use the raw model weights instead of the EMA")
    parser.add_argument("--fps", type=float, default=20, help="frames per second of the mp4 files")
    parser.add_argument("--check_fidelity", action="store_true", help="score samples with the built-in shapes class-fidelity checker")
    parser.add_argument("--device", type=str, default="auto", choices=["auto", "cpu", "cuda"], help="where to sample (auto: a GPU when there is one)")
    parser.add_argument("--sequence_parallel_size", type=int, default=1, help="under torchrun: processes that split each step's tokens (as in train.py); the rest sample other conditions")
    parser.add_argument("--cfg_parallel", action="store_true", help="under torchrun: the conditional and unconditional halves of each step on two processes (world = dp x 2 x sp)")
    add_speed_flags(parser)
    add_broadcast_flags(parser)
    parser.add_argument("--sequence_parallel_type", type=str, default=None, choices=["fastseq", "longseq", "ulysses", "dsp"], help="default: dsp for Latte, fastseq otherwise")
    return parser


def add_speed_flags(parser: argparse.ArgumentParser, ddp: bool = False) -> None:
    """--mixed_precision, --enable_flashattn, --enable_modulate_kernel, --compile, --compile_scope, --float8, --bf16_residual, --cuda_graph (sample.py and,
    ddp=True, sample_ddp.py: no --cfg_parallel, sequence parallelism or --attention_broadcast there)."""
    parser.add_argument("--mixed_precision", type=str, default=None, choices=list(PRECISIONS), help="autocast dtype (default: bf16 on a GPU, fp32 on the CPU)")
    parser.add_argument("--enable_flashattn", action="store_true", help="attention on the fused GPU kernels only (cuDNN/flash; bf16/fp16)")
    parser.add_argument("--enable_modulate_kernel", action="store_true", help="Triton fused LayerNorm + modulate (adaLN) in every block")
    parser.add_argument("--compile", action="store_true", help="GPU: torch.compile the model and capture each whole denoising step as one CUDA graph"
                        + ("" if ddp else " (not under --cfg_parallel or sequence parallelism: compiled only)"))
    parser.add_argument("--compile_scope", type=str, default="auto", choices=["auto", "model", "blocks"],
                        help="what --compile compiles: the whole model (faster, longer first call) or each block; auto: "
                        + ("the whole model" if ddp else "model on one process, blocks under sequence parallelism"))
    parser.add_argument("--float8", action="store_true", help="GPU of compute capability 8.9+ (Ada, Hopper), bf16: the blocks' qkv and MLP GEMMs in float8 e4m3 "
                        "(weights per channel, activations per row; fc1's GELU and the row quantization in one Triton pass)")
    parser.add_argument("--bf16_residual", action="store_true", help="DiT / VDiT under bf16/fp16: carry the residual stream in that dtype, as train.py's flag "
                        "(less memory traffic; changes rounding)")
    parser.add_argument("--cuda_graph", nargs="?", const="on", default="off", choices=["on", "off"],
                        help="GPU: capture each denoising step as a CUDA graph without compiling (--compile does it too; on every "
                        + ("rank)" if ddp else "data-parallel rank, not under --cfg_parallel or sequence parallelism); "
                           "with --attention_broadcast one graph per compute/reuse pattern of the schedule"))


def add_broadcast_flags(parser: argparse.ArgumentParser) -> None:
    """--attention_broadcast and its ranges / periods (video models; opendit/sampling/broadcast.py)."""
    parser.add_argument("--attention_broadcast", action="store_true", help="video models: reuse each attention's output across steps in the middle of the schedule")
    parser.add_argument("--broadcast_range", type=str, default="0.2,0.8", help="START,END fractions of the steps where spatial (VDiT: all) attention is reused")
    parser.add_argument("--broadcast_range_temporal", type=str, default="0.1,0.9", help="START,END fractions of the steps where Latte's temporal attention is reused")
    parser.add_argument("--broadcast_every", type=int, default=2, help="spatial attention: computed once every K steps in its range, reused in between")
    parser.add_argument("--broadcast_every_temporal", type=int, default=4, help="temporal attention: computed once every K steps in its range")
    parser.add_argument("--broadcast_mlp_range", type=str, default="0,0", help="START,END fractions of the steps where each block's MLP output is reused too (default: never)")
    parser.add_argument("--broadcast_mlp_every", type=int, default=2, help="MLPs: computed once every K steps in their range")


def resolve_speed_flags(args: argparse.Namespace, device: torch.device) -> None:
    """Default precision by device; one-line errors for flags the device cannot run."""
    if args.mixed_precision is None:
        args.mixed_precision = "bf16" if device.type == "cuda" else "fp32"
    args.cuda_graph = cuda_graph_on(args)
    gpu_only = [flag for flag, on in (("--enable_flashattn", args.enable_flashattn), ("--compile", args.compile), ("--cuda_graph", args.cuda_graph),
                                      ("--mixed_precision fp16", args.mixed_precision == "fp16")) if on]
    if device.type != "cuda" and gpu_only:
        raise UsageError(f"{' and '.join(gpu_only)} need{'s' if len(gpu_only) == 1 else ''} a CUDA GPU")
    if args.enable_flashattn and args.mixed_precision == "fp32":
        raise UsageError("--enable_flashattn needs --mixed_precision bf16 or fp16")
    if getattr(args, "float8", False):
        from opendit.kernels.float8 import float8_supported

        if not float8_supported(device):
            raise UsageError("--float8 needs a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell)")
        if args.mixed_precision != "bf16":
            raise UsageError("--float8 needs --mixed_precision bf16")
        if getattr(args, "sequence_parallel_size", 1) > 1:
            raise UsageError("--float8 does not run with --sequence_parallel_size > 1 (the parallel attention slices qkv's bf16 weight)")
    if getattr(args, "bf16_residual", False):
        if args.mixed_precision == "fp32":
            raise UsageError("--bf16_residual needs --mixed_precision bf16 or fp16")
        if (getattr(args, "model", None) or "").startswith("Latte"):
            raise UsageError(f"--bf16_residual: {args.model} keeps its residual stream in fp32 (DiT and VDiT only)")
    if getattr(args, "attention_broadcast", False):
        from opendit.sampling.broadcast import config_from_args

        config_from_args(args)  # one-line errors for bad ranges / periods
        if args.compile:  # measured: compiled blocks broken at each wrapper ran slower than eager (docs/benchmarks.md)
            raise UsageError("--attention_broadcast does not run under --compile (compiled with it was slower): use --cuda_graph --enable_modulate_kernel for its fast path")
        if not args.use_video:
            raise UsageError("--attention_broadcast is for the video models (VDiT, Latte, vDiT)")


def speed_up(args: argparse.Namespace, model: torch.nn.Module, mesh=None) -> torch.nn.Module:
    """Kernels, sequence parallelism and compile (whole model or per block) through parallelize (no data-parallel wrapper)."""
    from opendit.parallel import parallelize

    scope = getattr(args, "compile_scope", "blocks")
    scope = ("model" if mesh is None else "blocks") if scope == "auto" else scope
    # bf16 / fp16 on CUDA: each MLP's GELU in its fc1 GEMM's epilogue (sampling runs without autograd; fp32 and the CPU
    # keep the reference path)
    model.kernels.gelu_epilogue = getattr(args, "gelu_epilogue", True) and getattr(args, "mixed_precision", "fp32") in ("bf16", "fp16")
    return parallelize(model, mesh, plugin=None, fused_adaln=args.enable_modulate_kernel, flash_attention=args.enable_flashattn, compile=args.compile and scope,
                       sequence_parallel_type=getattr(args, "sequence_parallel_type", None), sequence_parallel_overlap=False,  # plain collectives: faster on NVLink
                       low_precision_residual=getattr(args, "bf16_residual", False))


def resolve_model_flags(args: argparse.Namespace, train_config: Optional[dict]) -> list:
    """Fill unset model flags from the checkpoint's training config, then from OpenDiT's defaults; a one-line error
    when a given flag contradicts the config. -> notes to print (a --num_frames other than the trained one)"""
    saved_args = (train_config or {}).get("args", {})
    saved_model = (train_config or {}).get("model", {})
    notes = []
    for key in MODEL_DEFAULTS:
        given, saved = getattr(args, key), saved_args.get(key)
        if given is None or saved is None or given == saved:
            continue
        if key == "num_frames":  # the temporal position embedding is computed for any count
            if args.use_video or saved_args.get("use_video"):
                notes.append(f"note: --num_frames {given}: the checkpoint was trained on {saved}-frame clips")
        elif key != "vae" or (given == "none") != (saved == "none"):  # ema, mse or a local VAE folder: the same latent space
            raise UsageError(f"--{key} {given}: the checkpoint in --ckpt {args.ckpt} was trained with {saved}; leave the flag out to use the checkpoint's")
    for key, default in MODEL_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, saved_args.get(key, default))
    for key in ("depth", "hidden_size", "num_heads"):
        setattr(args, key, saved_model.get(key))
    if saved_args.get("use_video"):
        args.use_video = True
    return notes


def resolve_text_flags(args: argparse.Namespace, state_dict: dict, prompts: list, train_config: Optional[dict]) -> int:
    """A text model needs prompts and takes --text_encoder from the checkpoint; a class model refuses both. -> text_dim"""
    text_dim = state_dict["text_embedder.weight"].shape[1] if "text_embedder.weight" in state_dict else 0
    if text_dim and args.labels is not None and "y_embedder.embedding_table.weight" not in state_dict:
        raise UsageError(f"--labels {args.labels}: the model in --ckpt {args.ckpt} has no class labels (it was built with num_classes=0)")
    if text_dim and not prompts:
        raise UsageError(f"--ckpt {args.ckpt}: a text-conditioned model needs --prompt \"...\" (repeatable) or --prompt_path FILE")
    if not text_dim and (args.prompt or args.prompt_path):
        raise UsageError(f"--prompt/--prompt_path: the model in --ckpt {args.ckpt} is not text-conditioned; use --labels")
    if not text_dim and args.text_encoder is not None:
        raise UsageError(f"--text_encoder: the model in --ckpt {args.ckpt} is not text-conditioned")
    if text_dim and args.text_encoder is None:
        args.text_encoder = (train_config or {}).get("args", {}).get("text_encoder") or DEFAULT_TEXT_ENCODER
    return text_dim


def setup_parallel(args: argparse.Namespace):
    """Join torchrun's process group when there is one (or sp / cfg parallelism asks for it). -> (DistInfo or None, layout)"""
    from opendit.parallel.process import launched_world_size, setup_distributed

    if launched_world_size() == 1 and args.sequence_parallel_size == 1 and not args.cfg_parallel:
        return None, SamplingLayout()
    info = setup_distributed(args.device)
    return info, build_layout(info.rank, info.world_size, args.sequence_parallel_size, args.cfg_parallel, info.device.type)


def build_sampling_model(args: argparse.Namespace, config: dict, state_dict: dict, device: torch.device, has_config: bool = True) -> torch.nn.Module:
    """The model of config with the checkpoint's weights (strict), in eval mode; a one-line error when they do not fit
    (has_config=False: the checkpoint carried no training config, so the model flags came from the user or the defaults)."""
    with torch.device(device):  # initialised where it runs: the random init of a large model is slow on the CPU
        model = build_model(config)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        why = weights_mismatch(model, state_dict) or str(e).strip().splitlines()[-1][:300]
        hint = ("; the file carries no config, so the model came from the flags: pass the export folder or its model.safetensors, which carry "
                "the config (or the --model, --image_size and --num_classes it was trained with)") if not has_config and os.path.isfile(args.ckpt) else ""
        raise UsageError(f"--ckpt {args.ckpt}: weights do not fit {args.model} at --image_size {args.image_size} ({why}){hint}") from None
    if getattr(args, "float8", False):  # quantized from the fp32 weights, before the bf16 cast
        from opendit.kernels.float8 import to_float8

        to_float8(model, fast_accum=FLOAT8_FAST_ACCUM)
    return cast_matmul_weights(model.eval(), PRECISIONS[getattr(args, "mixed_precision", None) or "fp32"])


def cast_matmul_weights(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Store every Linear / Conv weight and bias in the autocast dtype: the casts autocast makes on each forward, made
    once (the same numbers, no fp32 weight read per step). A no-op in fp32."""
    if dtype != torch.float32:
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
                module.to(dtype)
    return model


def output_files(folder: str) -> list:
    """The files of an earlier sample.py run in folder (OUTPUT_FILE), sorted; [] when there is no such folder."""
    return sorted(n for n in os.listdir(folder) if OUTPUT_FILE.fullmatch(n) and os.path.isfile(os.path.join(folder, n))) if os.path.isdir(folder) else []


def check_output(args: argparse.Namespace) -> None:
    """Before anything loads: --output must be (or be creatable as) a folder, and hold no earlier run's files unless --overwrite."""
    blocked = file_in_path(args.output)
    if blocked:
        raise UsageError(f"--output {args.output}: {blocked} is a file, not a folder")
    earlier = output_files(args.output)
    if earlier and not args.overwrite:
        raise UsageError(f"--output {args.output}: holds {len(earlier)} files of an earlier run ({', '.join(earlier[:3])}{', ...' if len(earlier) > 3 else ''}); "
                         "pass --overwrite to replace them, or choose another folder")


def gather_samples(outputs: list, layout: SamplingLayout) -> Optional[torch.Tensor]:
    """Every dp group's decoded samples, in order, on rank 0 (None elsewhere)."""
    mine = torch.cat(outputs) if outputs else None
    if layout.world == 1:
        return mine
    import torch.distributed as dist

    parts = [None] * layout.world
    dist.all_gather_object(parts, mine)
    return torch.cat([p for p in parts if p is not None]) if layout.rank == 0 else None


def check_sampling_flags(args: argparse.Namespace) -> None:
    """One-line errors, before anything loads, for values no run can use (sample.py and sample_ddp.py)."""
    for flag in ("per_class", "batch_size", "num_fid_samples", "per_proc_batch_size"):
        if getattr(args, flag, 1) < 1:
            raise UsageError(f"--{flag} {getattr(args, flag)}: must be at least 1")
    if not math.isfinite(args.cfg_scale):
        raise UsageError(f"--cfg_scale {args.cfg_scale:g}: must be a finite number (<= 1: no guidance)")
    if not (math.isfinite(getattr(args, "fps", 1)) and getattr(args, "fps", 1) > 0):
        raise UsageError(f"--fps {args.fps:g}: must be a positive number")
    check_steps(args.sampler, args.num_sampling_steps)


@torch.no_grad()
def sample(args: argparse.Namespace) -> dict:
    check_sampling_flags(args)
    check_output(args)
    state_dict, train_config = load_model_weights(args.ckpt, use_ema=not args.use_model)
    notes = resolve_model_flags(args, train_config)
    check_model_flags(args.model, args.image_size, args.vae, args.use_video)
    prompts = read_prompts(args)
    text_dim = resolve_text_flags(args, state_dict, prompts, train_config)
    torch.manual_seed(args.seed)  # the same on every rank: noise is drawn for all samples, each dp group takes its share
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.set_flush_denormal(True)
    info, layout = setup_parallel(args)
    device = info.device if info else torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    resolve_speed_flags(args, device)
    if wants_graph(args) and (layout.cfg > 1 or layout.sp > 1):
        notes.append("note: --compile / --cuda_graph: steps with --cfg_parallel or sequence parallelism run without CUDA graphs (their collectives are not captured)")
    for note in notes if layout.rank == 0 else []:
        print(note)

    vae = load_vae(args.vae, device)
    text_encoder = load_text_encoder(args.text_encoder, device) if text_dim else None
    if text_encoder is not None and text_encoder.dim != text_dim:
        raise UsageError(f"--text_encoder {args.text_encoder}: gives {text_encoder.dim}-d embeddings; the checkpoint's model takes {text_dim}-d")
    config = model_config(args, vae, text_encoder)
    model = speed_up(args, build_sampling_model(args, config, state_dict, device, has_config=train_config is not None), layout.mesh)

    labels, prompt_ids = conditions(args, prompts, model.y_embedder is not None)
    name_class = not prompts or args.labels is not None
    fidelity_labels = (labels if name_class else prompt_classes([prompts[j] for j in prompt_ids])) if args.check_fidelity else None
    if fidelity_labels is not None:
        check_shapes_labels(fidelity_labels)
    if layout.rank == 0:  # the writing rank: the folder exists before any sampling
        try:
            os.makedirs(args.output, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--output {args.output}: cannot be created ({e.strerror or e})") from None
    text_emb = text_encoder.encode(prompts) if text_encoder is not None else None  # (P, text_dim), each prompt once
    null_text = text_encoder.null_embedding() if text_encoder is not None else None  # (1, text_dim)
    latent_shape = (config["in_channels"], args.num_frames, config["input_size"], config["input_size"]) if args.use_video else (config["in_channels"], config["input_size"], config["input_size"])
    noise = torch.randn(len(labels), *latent_shape, device=device)  # drawn up front: DDIM / DPM-Solver samples do not depend on --batch_size
    outputs = []
    mine = layout.share(len(labels))  # this dp group's samples; every sp / cfg rank of the group takes part
    for start in range(mine.start, mine.stop, args.batch_size):
        chunk = slice(start, min(start + args.batch_size, mine.stop))
        y = torch.tensor(labels[chunk], device=device) if labels[0] is not None else None
        text = text_emb[prompt_ids[chunk]] if text_emb is not None else None
        latents = denoise(args, model, noise[chunk], y, text, null_text, cfg_group=layout.cfg_group)
        if layout.is_leader:  # the group's ranks hold the same latents: its first rank decodes them
            outputs.append(vae.decode(latents).clamp(-1, 1).cpu())
    samples = gather_samples(outputs, layout)
    if samples is None:
        return {"labels": labels}

    from opendit.utils.media import save_image, save_image_grid, save_video

    for name in output_files(args.output):  # --overwrite (checked up front): no earlier file stays beside the new ones
        os.remove(os.path.join(args.output, name))
    files = []
    for i, (x, label, j) in enumerate(zip(samples, labels, prompt_ids)):
        stem = os.path.join(args.output, file_stem(i, label, j, prompts, name_class))
        if args.use_video:
            files.append(save_video(x, stem + ".mp4", fps=args.fps))
        else:
            files.append(save_image(x, stem + ".png"))
    if not args.use_video:
        files.append(save_image_grid(samples, os.path.join(args.output, "grid.png"), nrow=max(args.per_class, 4) if args.per_class > 1 else 4))
    print(f"Saved {plural(len(samples), 'sample')} to {args.output}")
    result = {"files": files, "labels": labels}
    if prompts:
        result["prompts"] = [prompts[j] for j in prompt_ids]
    if args.check_fidelity:
        directions = prompt_directions([prompts[j] for j in prompt_ids]) if prompts else None
        result.update(check_fidelity(samples, fidelity_labels, args.use_video, args.output, directions))
    return result


def main(argv: Optional[list] = None) -> dict:
    args = get_parser().parse_args(argv)
    try:
        return run_or_exit(sample, args)  # sequence parallelism's heads, tokens and world size: one line (UsageError)
    finally:
        from opendit.parallel.process import cleanup

        cleanup()


if __name__ == "__main__":
    main()
