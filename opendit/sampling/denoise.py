"""The denoising loop: DDPM, DDIM or DPM-Solver from noise, with classifier-free guidance. fp32 without --compile
runs the reference loops of opendit.diffusion; bf16 / fp16, --compile, --cfg_parallel or --attention_broadcast run the
engine (engine.py)."""
import argparse
from typing import Optional

import torch
import torch.distributed as dist

from opendit.builders import PRECISIONS
from opendit.diffusion import create_diffusion
from opendit.errors import UsageError
from opendit.sampling.engine import Engine, Guided, make_schedule

SAMPLERS = ("ddpm", "ddim", "dpm-solver")
TRAINING_STEPS = 1000  # the schedule every sampler spaces its steps over (create_diffusion's diffusion_steps)
_ENGINES: dict = {}  # one engine (and its CUDA graph) per model and sampling setting, reused across batches


def check_steps(sampler: str, steps: int) -> None:
    """One-line error for a --num_sampling_steps the sampler cannot space over the training schedule."""
    if sampler == "ddim":  # an integer stride over the schedule: 1000 / stride, rounded up
        allowed = sorted({len(range(0, TRAINING_STEPS, stride)) for stride in range(1, TRAINING_STEPS)})
        if steps not in allowed:
            near = [n for n in (max([n for n in allowed if n < steps], default=None), min([n for n in allowed if n > steps], default=None)) if n]
            raise UsageError(f"--num_sampling_steps {steps}: --sampler ddim takes a count that an integer stride over the {TRAINING_STEPS}-step schedule "
                             f"gives ({allowed[0]}-{allowed[-1]}, e.g. 50, 100, 250; nearest: {' or '.join(map(str, near))})")
        return
    low, high = (2, TRAINING_STEPS) if sampler == "ddpm" else (1, TRAINING_STEPS - 1)  # DDPM's posterior needs 2; DPM-Solver: steps + 1 distinct timesteps
    if not low <= steps <= high:
        raise UsageError(f"--num_sampling_steps {steps}: --sampler {sampler} takes {low} to {high} steps (the schedule has {TRAINING_STEPS})")


def cuda_graph_on(args: argparse.Namespace) -> bool:
    """--cuda_graph as parsed ("on" / "off") or as resolve_speed_flags leaves it (True / False)."""
    return getattr(args, "cuda_graph", False) in (True, "on")


def wants_graph(args: argparse.Namespace) -> bool:
    """--compile or --cuda_graph asks for the step as CUDA graphs."""
    return getattr(args, "compile", False) or cuda_graph_on(args)


def uses_engine(args: argparse.Namespace, cfg_group: Optional[dist.ProcessGroup] = None) -> bool:
    return (getattr(args, "mixed_precision", "fp32") != "fp32" or wants_graph(args) or cfg_group is not None
            or getattr(args, "attention_broadcast", False))


def broadcast_config(args: argparse.Namespace):
    """The attention-broadcast settings (a hashable BroadcastConfig), or None when --attention_broadcast is off."""
    if not getattr(args, "attention_broadcast", False):
        return None
    from opendit.sampling.broadcast import config_from_args

    return config_from_args(args)


def step_has_collectives(args: argparse.Namespace, cfg_group: Optional[dist.ProcessGroup] = None) -> bool:
    """Whether a denoising step talks to other ranks: --cfg_parallel (the halves' all-gather) or sequence parallelism
    (the attention's collectives). Data-parallel ranks (sample_ddp.py, sample.py's dp groups) step alone."""
    return cfg_group is not None or getattr(args, "sequence_parallel_size", 1) > 1


def graph_on(args: argparse.Namespace, device: torch.device, cfg_group: Optional[dist.ProcessGroup] = None) -> bool:
    """--compile / --cuda_graph capture the step on a CUDA device when it has no collectives, on any number of ranks
    (steps with collectives run eagerly: their capture is not measured on several GPUs yet)."""
    return wants_graph(args) and device.type == "cuda" and not step_has_collectives(args, cfg_group)


def get_engine(args: argparse.Namespace, model: torch.nn.Module, device: torch.device, cfg_group: Optional[dist.ProcessGroup] = None) -> Engine:
    """The engine for these flags, built once (schedule constants on the device) and cached with its CUDA graph."""
    broadcast = broadcast_config(args)
    graph = graph_on(args, device, cfg_group)
    compile_tail = getattr(args, "compile", False) and getattr(args, "compiled_tail", True)  # compiled_tail=False: bench/sample.py's "before" row
    key = (id(model), args.sampler, args.num_sampling_steps, args.noise_schedule, args.cfg_scale, args.cfg_channels, getattr(args, "mixed_precision", "fp32"),
           graph, args.vae == "none", id(cfg_group), str(device), broadcast, compile_tail)
    if key not in _ENGINES:
        schedule = make_schedule(args.sampler, args.num_sampling_steps, args.noise_schedule, device)
        guided = Guided(model, args.cfg_scale, None if args.cfg_channels == "all" else 3, PRECISIONS[getattr(args, "mixed_precision", "fp32")], cfg_group)
        if broadcast is not None:
            from opendit.sampling.broadcast import AttentionBroadcast

            broadcast = AttentionBroadcast(broadcast)
        _ENGINES[key] = Engine(schedule, guided, clip=args.vae == "none", cuda_graph=graph, broadcast=broadcast, compile_tail=compile_tail)
    return _ENGINES[key]


def denoise(
    args: argparse.Namespace,
    model: torch.nn.Module,
    z: torch.Tensor,
    y: Optional[torch.Tensor],
    text: Optional[torch.Tensor] = None,
    null_text: Optional[torch.Tensor] = None,
    cfg_group: Optional[dist.ProcessGroup] = None,
    progress: bool = True,
) -> torch.Tensor:
    """Run the chosen sampler from noise z with labels y and/or pooled prompts text; when cfg_scale > 1, guide
    against the null class and the empty prompt's embedding null_text (1, text_dim). cfg_group: two ranks that run
    the conditional and the unconditional half of each step. progress: a tqdm bar over the steps."""
    use_cfg = args.cfg_scale > 1.0
    if uses_engine(args, cfg_group):
        cond = dict(y=y, text=text)
        uncond = dict(y=None if y is None else torch.full_like(y, args.num_classes), text=None if text is None else null_text.expand_as(text)) if use_cfg else None
        return get_engine(args, model, z.device, cfg_group).sample(z, cond, uncond, progress=progress)
    if use_cfg:
        z = torch.cat([z, z], dim=0)
        if y is not None:
            y = torch.cat([y, torch.full_like(y, args.num_classes)], dim=0)  # the null class is num_classes
        if text is not None:
            text = torch.cat([text, null_text.expand_as(text)], dim=0)  # the null prompt is ""
        model_kwargs = dict(y=y, text=text, cfg_scale=args.cfg_scale, cfg_channels=None if args.cfg_channels == "all" else 3)
        model_fn = model.forward_with_cfg
    else:
        model_kwargs = dict(y=y, text=text)
        model_fn = model.forward
    if args.sampler == "ddpm":
        diffusion = create_diffusion(str(args.num_sampling_steps), noise_schedule=args.noise_schedule)
        samples = diffusion.p_sample_loop(model_fn, z.shape, z, clip_denoised=args.vae == "none", model_kwargs=model_kwargs, device=z.device, progress=progress)
    elif args.sampler == "ddim":
        diffusion = create_diffusion(f"ddim{args.num_sampling_steps}", noise_schedule=args.noise_schedule)
        samples = diffusion.ddim_sample_loop(model_fn, z.shape, z, clip_denoised=args.vae == "none", model_kwargs=model_kwargs, device=z.device, progress=progress)
    else:
        diffusion = create_diffusion("", noise_schedule=args.noise_schedule)
        samples = diffusion.dpm_solver_sample_loop(model_fn, z.shape, num_steps=args.num_sampling_steps, noise=z, model_kwargs=model_kwargs, device=z.device, progress=progress)
    return samples.chunk(2, dim=0)[0] if use_cfg else samples
