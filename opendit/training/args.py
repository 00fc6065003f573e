"""train.py's flags (OpenDiT's names and defaults, then additions) and the checks that refuse bad ones in one line."""
import argparse
import math

import torch

from opendit.builders import PRECISIONS, check_model_flags, model_size
from opendit.errors import UsageError
from opendit.parallel.parallelize import BLOCKS_PER_UNIT, PLUGINS
from opendit.training.experiment import restarted_by_torchrun
from opendit.training.graph_step import graph_step_refusal
from opendit.training.profile import parse_steps
from opendit.utils.cli import USAGE, HelpFormatter

DEFAULT_BATCH = 2


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, usage=USAGE)
    # OpenDiT's flags, same names and defaults; Meta DiT's hyphenated spellings are aliases.
    parser.add_argument("--model", type=str, default="DiT-XL/2", help="registry name, e.g. DiT-XL/2 or VDiT-XL/1x2x2")
    parser.add_argument("--vae", type=str, default="ema", help="ema | mse (Stable Diffusion VAEs) | none (pixel space) | a local path or hub id")
    parser.add_argument("--use_video", action="store_true", help="train a video model (VDiT, Latte, vDiT) on clips")
    parser.add_argument("--plugin", type=str, default="zero2", help="zero2 | zero3 (FSDP2: sharded optimizer, gradients, EMA; zero3 also parameters) | ddp; one process trains unwrapped")
    parser.add_argument("--outputs", "--results-dir", type=str, default="./outputs", help="parent folder of the experiment folders")
    parser.add_argument("--load", type=str, default=None, help="resume from a checkpoint folder or an experiment folder (its latest checkpoint); auto: --experiment_dir's latest, if any")
    parser.add_argument("--num_frames", type=int, default=16, help="frames per clip (video)")
    parser.add_argument("--frame_interval", type=int, default=1, help="temporal stride between sampled frames (video)")
    parser.add_argument("--text_encoder", type=str, default="openai/clip-vit-base-patch32", help="CLIP text encoder (hub id or folder) for captioned data; sample.py reuses it")
    parser.add_argument("--data_path", "--data-path", type=str, default="./datasets", help="dataset location; when it does not exist the built-in shapes data is used")
    parser.add_argument("--image_size", "--image-size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--num_classes", "--num-classes", type=int, default=1000, help="size of the class-label table (unlabelled data: none is built)")
    parser.add_argument("--epochs", type=int, default=1400, help="passes over the data (--max_steps stops earlier)")
    parser.add_argument("--batch_size", type=int, default=None, help=f"per data-parallel rank (default: {DEFAULT_BATCH})")
    parser.add_argument("--global_batch_size", "--global-batch-size", type=int, default=None, help="Meta DiT's batch flag: the batch over all data-parallel ranks (divided by their number)")
    parser.add_argument("--global_seed", "--global-seed", type=int, default=42, help="t and noise: seed global_seed * dp_size + dp_rank (sequence-parallel peers share it); data order: global_seed")
    parser.add_argument("--num_workers", "--num-workers", type=int, default=4, help="DataLoader worker processes")
    parser.add_argument("--log_every", "--log-every", type=int, default=10, help="log loss and speed every N steps")
    parser.add_argument("--ckpt_every", "--ckpt-every", type=int, default=1000, help="checkpoint every N steps (<= 0: only at the end)")
    parser.add_argument("--mixed_precision", type=str, default="bf16", choices=list(PRECISIONS), help="autocast dtype; weights, optimizer and EMA stay fp32")
    parser.add_argument("--grad_clip", type=float, default=1.0, help="max global gradient norm (<= 0 disables; must be finite)")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    parser.add_argument("--grad_checkpoint", action="store_true", help="activation checkpointing per transformer block")
    parser.add_argument("--enable_modulate_kernel", action="store_true", help="Triton fused kernels: LayerNorm + modulate (adaLN) and gate + residual in every block and the final layer, and in training fc1's bias + GELU "
                        "(with quack-kernels on a Hopper GPU: inside quack's GEMM epilogues, and the other forward and input-gradient GEMMs quack's too; "
                        "OPENDIT_QUACK=0 keeps the Triton kernel and cuBLAS)")
    parser.add_argument("--enable_layernorm_kernel", action="store_true", help="same fused kernel (our LayerNorm is fused with the modulation)")
    parser.add_argument("--enable_flashattn", action="store_true", help="attention on the fused GPU kernels only (cuDNN/flash; bf16/fp16)")
    parser.add_argument("--sequence_parallel_size", type=int, default=1, help="sequence-parallel group size")
    parser.add_argument("--sequence_parallel_type", type=str, default=None, help="fastseq (longseq) | ulysses | dsp (Latte only); default: dsp for Latte, fastseq otherwise")
    parser.add_argument("--sequence_parallel_overlap", type=str, default="off", choices=["on", "off"], help="FastSeq: overlap the AllGather with the qkv GEMM through an async ring (measured slower on one NVLink host, see docs/benchmarks.md)")
    # Additions.
    parser.add_argument("--dataset_size", type=int, default=10000, help="items per epoch of the built-in shapes data")
    parser.add_argument("--max_steps", type=int, default=None, help="stop after this many optimizer steps (default: run all epochs)")
    parser.add_argument("--depth", type=int, default=None, help="override the registry model's depth (small experiments)")
    parser.add_argument("--hidden_size", type=int, default=None, help="override the registry model's hidden size")
    parser.add_argument("--num_heads", type=int, default=None, help="override the registry model's number of heads")
    parser.add_argument("--noise_schedule", type=str, default="linear", choices=["linear", "squaredcos_cap_v2"], help="beta schedule (DiT: linear)")
    parser.add_argument("--snr_gamma", type=float, default=0.0, help="> 0: Min-SNR-gamma weighting of the noise MSE (e.g. 5; Hang et al., 2023); 0: DiT's unweighted loss")
    parser.add_argument("--lr_schedule", type=str, default="constant", choices=["constant", "cosine"], help="constant (DiT) or cosine decay to 0 at the last step")
    parser.add_argument("--lr_warmup_steps", type=int, default=0, help="linear learning-rate warmup steps")
    parser.add_argument("--ema_decay", type=float, default=0.9999, help="EMA of the weights: ema = decay * ema + (1 - decay) * weights each step, in [0, 1]")
    parser.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay (>= 0)")
    parser.add_argument("--device", type=str, default="auto", choices=["auto", "cpu", "cuda"], help="auto: the GPU when there is one (torchrun: GPU LOCAL_RANK), else the CPU")
    # Data (opendit/data/build.py).
    parser.add_argument("--dataset", type=str, default="auto", choices=["auto", "shapes", "folder", "cifar10", "csv", "latents"], help="auto: shapes when --data_path does not exist, else inferred from it (a .csv, a latent cache, CIFAR-10's folder, a class folder)")
    parser.add_argument("--on_bad_sample", type=str, default="skip", choices=["skip", "error"], help="an unreadable image or video: replace it by another item and log the count, or stop")
    parser.add_argument("--sharing_strategy", type=str, default="file_descriptor", choices=["file_descriptor", "file_system"],
                        help="how DataLoader workers hand batches over (torch.multiprocessing): a file descriptor from each worker's resource-sharer thread, or a shared-memory file name (torch_shm_manager)")
    parser.add_argument("--short_video", type=str, default="loop", choices=["loop", "skip"], help="a video shorter than the clip: shrink the stride, then loop it; or skip it as a bad sample")
    parser.add_argument("--captions", type=str, default="auto", choices=["auto", "on", "off"], help="condition on captions with --text_encoder: auto (CSV data and captioned latent caches), on (shapes too), off")
    # Distributed engine.
    parser.add_argument("--experiment_dir", type=str, default=None, help="use this experiment folder instead of a new {outputs}/NNN-model (restart-safe with --load auto)")
    parser.add_argument("--max_bad_steps", type=int, default=5, help="stop after this many steps in a row with a non-finite loss or gradient norm (each is skipped)")
    parser.add_argument("--profile_steps", type=str, default="",
                        help="FIRST-LAST (e.g. 61-65): profile these steps with torch.profiler into {experiment}/profile/ (summary.md: the GPU's busy "
                             "share, top kernels, longest waits and host operations; trace.json for Perfetto); the log line covering them includes the profiler's overhead")
    parser.add_argument("--sample_every", type=int, default=0, help="every N steps, sample the EMA (fixed noise and conditions) into {experiment}/samples/ and TensorBoard (0: never)")
    parser.add_argument("--ckpt_keep", type=int, default=3, help="keep the newest K checkpoints (<= 0: keep all)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    parser.add_argument("--bf16_residual", action="store_true", help="DiT under bf16/fp16 autocast: carry the residual stream in that dtype instead of fp32 (less memory traffic; changes rounding)")
    parser.add_argument("--cuda_graph", type=str, default="auto", choices=["auto", "on", "off"], help="capture the whole step (forward, backward, clipping, AdamW, EMA) as one CUDA graph; auto: on wherever it can run (one CUDA process, bf16/fp32, no sequence parallelism or --grad_checkpoint)")
    parser.add_argument("--fsdp_blocks_per_unit", type=int, default=BLOCKS_PER_UNIT, help="zero2/zero3: blocks gathered and reduced together (fewer units: less FSDP2 CPU time per step)")
    parser.add_argument("--peak_tflops", type=float, default=None, help="per-GPU peak for MFU (default: 989 for bf16/fp16 on H100/H200, else no MFU)")
    return parser


def check_flags(args: argparse.Namespace, world_size: int) -> None:
    """Refuse, in one line, flags whose feature is not in this version or that contradict each other."""
    if args.sequence_parallel_size < 1 or world_size % args.sequence_parallel_size:
        raise UsageError(f"--sequence_parallel_size {args.sequence_parallel_size}: must divide the {world_size} processes")
    if args.global_batch_size is not None and args.batch_size is not None:
        raise UsageError("--global-batch-size and --batch_size: give one (the batch over all data-parallel ranks, or per rank)")
    if args.global_batch_size is None:
        args.batch_size = DEFAULT_BATCH if args.batch_size is None else args.batch_size
    else:  # Meta DiT's spelling: the whole batch, split over the data-parallel ranks
        dp_size = world_size // args.sequence_parallel_size
        if args.global_batch_size < 1 or args.global_batch_size % dp_size:
            raise UsageError(f"--global-batch-size {args.global_batch_size}: must be a positive multiple of the {dp_size} data-parallel ranks")
        args.batch_size = args.global_batch_size // dp_size
    if args.plugin not in PLUGINS:
        raise UsageError(f"--plugin {args.plugin}: choose zero2, zero3 or ddp")
    if args.load == "auto" and args.experiment_dir is None and not restarted_by_torchrun():
        raise UsageError("--load auto needs --experiment_dir (the folder whose latest checkpoint to resume)")
    if args.sequence_parallel_type not in (None, "fastseq", "longseq", "ulysses", "dsp"):
        raise UsageError(f"--sequence_parallel_type {args.sequence_parallel_type}: choose fastseq (longseq), ulysses or dsp")
    if args.sequence_parallel_type == "dsp" and not args.model.startswith("Latte"):
        raise UsageError(f"--sequence_parallel_type dsp (Dynamic Sequence Parallelism) needs a Latte model, not --model {args.model}")
    for flag in ("batch_size", "epochs", "num_frames", "frame_interval", "log_every", "dataset_size", "fsdp_blocks_per_unit", "max_bad_steps"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} {getattr(args, flag)}: must be at least 1")
    if args.num_classes < 0:
        raise UsageError(f"--num_classes {args.num_classes}: must be at least 0 (0: no class labels)")
    if args.lr_warmup_steps < 0:
        raise UsageError(f"--lr_warmup_steps {args.lr_warmup_steps}: must be at least 0")
    if not args.snr_gamma >= 0:
        raise UsageError(f"--snr_gamma {args.snr_gamma}: must be at least 0 (0: no weighting)")
    if args.max_steps is not None and args.max_steps < 1:
        raise UsageError(f"--max_steps {args.max_steps}: must be at least 1")
    check_numbers(args)
    parse_steps(args.profile_steps, args.max_steps)
    if args.enable_flashattn and (args.mixed_precision == "fp32" or args.device == "cpu" or not torch.cuda.is_available()):
        raise UsageError("--enable_flashattn needs a CUDA GPU and --mixed_precision bf16 or fp16")
    if args.mixed_precision == "fp16" and (args.device == "cpu" or not torch.cuda.is_available()):
        raise UsageError("--mixed_precision fp16 needs a GPU; use bf16 or fp32 on the CPU")
    cuda = args.device != "cpu" and torch.cuda.is_available()
    why = graph_step_refusal(world_size, cuda, args.mixed_precision, args.sequence_parallel_size, args.grad_checkpoint)
    if args.cuda_graph == "on" and why:
        raise UsageError(f"--cuda_graph on: {why}")
    check_model_flags(args.model, args.image_size, args.vae, args.use_video)
    check_model_size(args)


def check_numbers(args: argparse.Namespace) -> None:
    """Refuse, in one line, out-of-range numbers (config.json never holds NaN or an infinity)."""
    for flag, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"--{flag} {value:g}: must be a finite number" + (" (<= 0 disables clipping)" if flag == "grad_clip" else ""))
    if args.lr < 0:
        raise UsageError(f"--lr {args.lr:g}: must be at least 0 (0 keeps the weights as they are)")
    if args.weight_decay < 0:
        raise UsageError(f"--weight_decay {args.weight_decay:g}: must be at least 0")
    if not 0 <= args.ema_decay <= 1:
        raise UsageError(f"--ema_decay {args.ema_decay:g}: must be in [0, 1]")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise UsageError(f"--peak_tflops {args.peak_tflops:g}: must be positive")
    for flag in ("num_workers", "sample_every"):
        if getattr(args, flag) < 0:
            raise UsageError(f"--{flag} {getattr(args, flag)}: must be at least 0")
    for flag in ("depth", "hidden_size", "num_heads"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UsageError(f"--{flag} {getattr(args, flag)}: must be at least 1")


def check_model_size(args: argparse.Namespace) -> None:
    """The hidden size must split into the heads, and the heads over the sequence-parallel ranks (DSP splits no heads)."""
    _, hidden, heads = model_size(args.model, args.depth, args.hidden_size, args.num_heads)
    if hidden % heads:
        raise UsageError(f"--num_heads {heads}: the hidden size {hidden} (--hidden_size) does not divide by it")
    sp, latte = args.sequence_parallel_size, args.model.startswith("Latte")
    if sp > 1 and heads % sp and not (latte and args.sequence_parallel_type in (None, "dsp")):
        raise UsageError(f"--sequence_parallel_size {sp}: the model's {heads} attention heads (--num_heads) do not divide by it")


def check_sequence_parallel_tokens(args: argparse.Namespace, model: torch.nn.Module) -> None:
    """A sample's tokens must split evenly over the sequence-parallel ranks (there is no padding); for Latte its token
    frames and its positions per frame each."""
    sp = args.sequence_parallel_size
    if sp == 1:
        return
    if hasattr(model, "frames_positions"):  # Latte: each rank holds whole frames, then whole position tracks
        t, s = model.frames_positions
        counts = {"token frames (--num_frames)": t, "positions per frame (--image_size)": s}
    elif hasattr(model, "grid"):  # VDiT, vDiT
        counts = {"tokens per clip (--num_frames, --image_size)": math.prod(model.grid)}
    else:
        counts = {"tokens per image (--image_size)": model.x_embedder.num_patches}
    for what, n in counts.items():
        if n % sp:
            raise UsageError(f"--sequence_parallel_size {sp}: the model's {n} {what} do not divide by it")


# Resume rule (README): flags that define what is being trained must match the checkpoint; the rest take effect.
FIXED_ON_RESUME = ("global_seed", "noise_schedule", "dataset", "use_video", "num_frames", "frame_interval", "captions")


def check_resume_flags(args: argparse.Namespace, resume_state, resume_dir: str = None) -> None:
    """Refuse, in one line, a resumed run of another model or whose data or objective flags differ from the
    checkpoint's (the model's shape is checked against its config); lr, schedule, max_steps, cadences and the rest take effect."""
    saved = (resume_state or {}).get("config", {}).get("args", {})
    if saved.get("model", args.model) != args.model:
        raise UsageError(f"--model {args.model}: the checkpoint {resume_dir} trained {saved['model']}; resuming cannot change the model (start a new run)")
    for flag in FIXED_ON_RESUME:
        if flag in saved and saved[flag] != getattr(args, flag):
            raise UsageError(f"--{flag} {getattr(args, flag)}: the checkpoint was trained with {saved[flag]}; resuming cannot change it (start a new run)")
