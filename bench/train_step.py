"""One-GPU training-step speed of a DiT (default DiT-XL/2 at 256) per speed-up, as a markdown table.

    python bench/train_step.py [--model DiT-B/2] [--batch_sizes 32,128] [--variants fp32,bf16,...,graph] [--time_cap 300]

A step is what train.py does: DiT hybrid loss (MSE + learned-sigma VB) at random timesteps on latents
(4 x 32 x 32, 1000 classes), backward, gradient clipping at 1.0, AdamW (fused) and an EMA update. Inputs are random
latents already on the GPU (the VAE is out of the step, as with a latent cache). MFU counts the model's training
FLOPs (6 x its multiply-adds per image: 711.8 GFLOP for DiT-XL/2 at 256) against a bf16 matmul peak measured in
the same run (20 products of 8192^3, a burst: the card is still at its full clock). "SM MHz" and "W" average
nvidia-smi's samples over the timed steps: a card at its power limit (700 W on an H200) lowers its clock. "peak GiB"
(allocated) and "reserved GiB" (held by PyTorch's allocator) span warm-up and the timed steps, since a CUDA graph
allocates its step's memory at capture.
Variants are cumulative where the name says so:

    fp32      all speed-ups off, fp32 with TF32 matmuls (what train.py does with --mixed_precision fp32)
    bf16      bf16 autocast (fp32 master weights)
    flash     bf16 + fused attention (--enable_flashattn: cuDNN/flash SDPA)
    kernels   bf16 + flash + Triton LayerNorm+modulate, gate+residual and bias+GELU (--enable_modulate_kernel)
    compile   bf16 + flash + torch.compile of each block (inductor fuses the norms itself)
    all       bf16 + flash + kernels + compile
    diffusers diffusers' DiTTransformer2DModel of the same size, bf16 autocast (an external peer)
    whole     compile, but torch.compile of the whole model instead of each block
    bf16res   compile + the residual stream in bf16 (KernelChoice.low_precision_residual)
    step      compile, stepped by train.py's own TrainStep (LR schedule, loss dict, ShardedAdamW, ShardedEMA)
    graph     step, captured as one CUDA graph after warm-up (opendit.training.graph_step, train.py --cuda_graph)
    graph-eager  graph without torch.compile (bf16 + flash)
    graph-bf16res  graph + bf16res

A "+modifier" changes one thing of the variant before it (several may follow, e.g. graph-bf16res+whole+muladd-ema):

    +whole       torch.compile of the whole model instead of each block
    +autotune    torch.compile mode "max-autotune-no-cudagraphs" (Triton GEMM templates with the pointwise epilogues,
                 e.g. the GELU after fc1, fused in where the benchmark says so; autotuning adds compile time)
    +tma         +autotune with inductor's persistent TMA GEMM templates too (Hopper; off in inductor by default)
    +coord       inductor's coordinate_descent_tuning (tunes the fused pointwise / reduction kernels' launch configs)
    +muladd-ema  TrainStep's EMA as the former foreach multiply + add (default: one foreach lerp)
    +no-rpr      torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False (PyTorch's default: True)
    +attn-cudnn, +attn-flash, +attn-efficient  attention through that SDPA backend only
    +kernels     our Triton kernels (custom ops) inside the compiled blocks, as --enable_modulate_kernel
    +bf16res     the residual stream in bf16 (KernelChoice.low_precision_residual), as --bf16_residual
    +aggressive  inductor's aggressive_fusion (fuses nodes without shared reads too)
    +no-gelu     with kernels: leave fc1's bias + GELU to PyTorch / inductor (the kernels' default: our Triton pass)
    +eager-loss  step / graph: the diffusion's loss terms uncompiled (default with compile: compiled, as train.py --compile)
    +inline-ema  graph: the EMA update inside its own step (default: deferred, beside the next step's forward and backward)
    +separate-norm  with kernels: the attention's gate + residual and the MLP's LayerNorm + modulate as two kernels
                 (the default: one, `gate_residual_layernorm_modulate`)
    +cast-weights  graph, bf16: autocast casts the fp32 weights at every step, and their gradients back (the default:
                 the step runs on bf16 copies that AdamW rewrites, opendit.training.bf16_weights)
    +per-weight-adamw  graph with bf16 copies: their AdamW as one launch per weight (the default: one launch over all)
    +no-adamw    diagnostic, graph with bf16 copies: the matmul weights' AdamW left out (the most that hiding it could
                 save; compare with +random-init on both sides: without updates DiT's zero-initialized adaLN and final
                 layer keep every gradient through the blocks at zero, and a GPU multiplying zeros runs faster)
    +no-ema      diagnostic, graph: the EMA update left out (the most that it costs beside the next step)
    +random-init  the zero-initialized weights (adaLN modulations, final layer) drawn from N(0, 0.02^2) before timing
    +separate-ema  graph, bf16: the EMA of the weights with bf16 copies as its own update beside the next step (12 bytes
                 a weight; the default: inside their AdamW pass, 8 bytes; the other parameters' EMA stays beside the next step)
    +separate-boundaries  with kernels: each block's last gate + residual and the next block's (or the final layer's)
                 LayerNorm + modulate as two kernels (the default: one, KernelChoice.fused_boundaries, as train.py
                 on one process or DDP)
    +fp32-biases  graph with bf16 copies: copies of the matmul weights only, the biases cast by autocast at every step
                 (the default: the biases copied too)
    +per-layer-mods  fused boundaries: each layer's adaLN modulation as its own GEMM (the default: one GEMM over the
                 stacked weights of every layer, DiT.layer_modulations)
    +gemm-biases  fused boundaries: proj's and fc2's biases in their GEMMs, their gradients summed by inductor (the
                 default: added in the boundary kernels, which sum their gradients too; blocks.without_bias)
    +plain-qkv-grad  fused boundaries: autograd's qkv gradient (inductor's stack kernel, then a second pass for the bias;
                 the default, as train.py: one Triton pass packs dq, dk, dv and sums the bias gradient, kernels/fused_qkv.py)
    +triton-boundaries  kernels: the block boundary's forward and backward as the Triton kernels (the default on CUDA:
                 Gluon's two-tile rows where the width splits, kernels/_gluon_ops.py; OPENDIT_GLUON=0 in train.py)
    +blaslt      every GEMM through cuBLASLt (torch.backends.cuda.preferred_blas_library("cublaslt"); the default:
                 cuBLAS, with cuBLASLt where PyTorch fuses a bias)
    +blocks-only  per-block compile of the blocks alone (the default, as train.py on one process: also the patch +
                 position embedding, the timestep embedder and the final layer; compile_blocks(ends=True))

The "compile s" column is the warm-up's time beyond its steps at the steady rate (compile, autotune, capture);
a graph that inductor has already compiled in this process or on this machine loads from its cache (less time).
`--attention_bench` first times each SDPA backend alone at the model's attention shape (fwd and fwd + bwd), and
attention with its (N, N) scores in memory (two batched GEMMs around a softmax; eager and compiled).
`--tiny` runs a 2-block model on small inputs (a CPU smoke check of the script itself).
`--profile V` profiles three steps of V: the top kernels, the time by kind of kernel, then per CUDA stream the busy
time and the idle gaps between its kernels, the longest gaps with the kernels around them (a CUDA graph's replays
show up on streams of their own) and the gaps by the kernel that follows them.
"""

import argparse
import contextlib
import os
import sys
import tempfile
import time
import traceback
import unittest.mock
from dataclasses import dataclass, replace
from functools import partial
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.timing import ClockPower  # noqa: E402
from opendit.diffusion import create_diffusion  # noqa: E402
from opendit.models import DiT_models  # noqa: E402
from opendit.models import blocks  # noqa: E402
from opendit.models.attention import Attention  # noqa: E402
from opendit.parallel.parallelize import compile_blocks, enable_fast_attention, enable_fused_adaln  # noqa: E402
from opendit.parallel.mesh import ParallelMesh  # noqa: E402
from opendit.training import bf16_weights  # noqa: E402
from opendit.training.ema import ShardedEMA  # noqa: E402
from opendit.training.graph_step import CudaGraphStep  # noqa: E402
from opendit.training.guard import DivergenceGuard  # noqa: E402
from opendit.training.optim import ShardedAdamW, lr_factor  # noqa: E402
from opendit.training.profile import trace_events, trace_kernels  # noqa: E402
from opendit.training.step import TrainStep  # noqa: E402
from opendit.utils.flops import train_flops_per_sample  # noqa: E402

@dataclass(frozen=True)
class Variant:
    """One configuration of the step: precision, attention, kernels, compile, the stepper, and knobs of issue 16."""

    dtype: torch.dtype = torch.bfloat16
    flash: bool = True  # fast_attention (cuDNN first)
    kernels: bool = False  # the Triton adaLN kernels
    compile: str = "blocks"  # "" (eager), "blocks" (per block) or "model" (whole model)
    stepper: str = "bench"  # "bench" (make_step), "train" (TrainStep) or "graph" (TrainStep as a CUDA graph)
    bf16_residual: bool = False
    compile_mode: Optional[str] = None  # torch.compile's mode
    attention: str = ""  # one SDPA backend forced ("cudnn", "flash", "efficient"); "" keeps fast_attention's order
    ema_lerp: bool = True  # TrainStep's EMA as one foreach lerp (False: the former mul + add)
    overlap_ema: bool = True  # graph: the EMA update deferred to a side stream beside the next forward and backward
    compile_loss: bool = True  # step / graph with compile: the diffusion's loss terms compiled too (train.py --compile)
    reduced_precision_reduction: bool = True  # torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    coordinate_descent: bool = False  # torch._inductor.config.coordinate_descent_tuning
    aggressive_fusion: bool = False  # torch._inductor.config.aggressive_fusion
    persistent_tma: bool = False  # torch._inductor.config.triton.enable_persistent_tma_matmul (Hopper TMA GEMM templates)
    fused_gelu: bool = True  # with kernels: fc1's bias + GELU as our Triton kernel too (KernelChoice.fused_gelu)
    fused_residual_norm: bool = True  # with kernels: the attention's gate + residual and the MLP's adaLN as one kernel
    fused_boundaries: bool = True  # with kernels: each block's last gate + residual and the next layer's adaLN as one kernel
    bf16_weights: bool = True  # graph, bf16: forward and backward on bf16 copies of the matmul weights (bf16_weights.py)
    compile_ends: bool = True  # compile "blocks": also the patch + position embedding, timestep embedder and final layer
    one_launch: bool = True  # graph with bf16 copies: their AdamW as one launch (MultiTensorAdamW), else one per weight
    skip_adamw: bool = False  # diagnostic, graph with copies: their AdamW left out of the step
    skip_ema: bool = False  # diagnostic, graph: the EMA update left out of the step
    random_init: bool = False  # zero-initialized weights drawn at random first (real gradients from the first step)
    fused_ema: bool = True  # graph with bf16 copies: the matmul weights' EMA updated in the AdamW pass
    blas: str = ""  # torch.backends.cuda.preferred_blas_library for the run ("": PyTorch's default, cuBLAS)
    bf16_biases: bool = True  # graph with bf16 copies: the matmul modules' biases copied too (bf16_weights.COPIED)
    stacked_mods: bool = True  # fused boundaries: every layer's adaLN modulation as one GEMM (DiT.layer_modulations)
    boundary_biases: bool = True  # fused boundaries: proj's and fc2's biases added (and summed backward) in the boundary kernels
    fused_qkv_grad: bool = True  # fused boundaries: the qkv gradient packed and its bias gradient summed in one Triton pass
    gluon_boundaries: bool = True  # kernels: the block boundary's kernels in Gluon where the width splits (else Triton)
    quack_mlp: bool = False  # fused boundaries: fc1's GELU and its gradient in quack's GEMM epilogues (kernels/quack_mlp.py)
    quack_gemms: str = ""  # with quack_mlp: the block's plain GEMMs of these kinds ("fwd+dgrad+wgrad") as quack's too


VARIANTS = {
    "fp32": Variant(torch.float32, flash=False, compile=""),
    "bf16": Variant(flash=False, compile=""),
    "flash": Variant(compile=""),
    "kernels": Variant(kernels=True, compile=""),
    "compile": Variant(),
    "all": Variant(kernels=True),
    "diffusers": Variant(flash=False, compile=""),
    "whole": Variant(compile="model"),
    "bf16res": Variant(bf16_residual=True),
    "step": Variant(stepper="train"),
    "graph": Variant(stepper="graph"),
    "graph-eager": Variant(compile="", stepper="graph"),
    "graph-bf16res": Variant(stepper="graph", bf16_residual=True),
}
MODIFIERS = {  # "+name" after a variant: one change to it
    "whole": dict(compile="model"),
    "autotune": dict(compile_mode="max-autotune-no-cudagraphs"),
    "tma": dict(compile_mode="max-autotune-no-cudagraphs", persistent_tma=True),
    "coord": dict(coordinate_descent=True),
    "muladd-ema": dict(ema_lerp=False),
    "no-rpr": dict(reduced_precision_reduction=False),
    "attn-cudnn": dict(attention="cudnn"),
    "attn-flash": dict(attention="flash"),
    "attn-efficient": dict(attention="efficient"),
    "kernels": dict(kernels=True),
    "bf16res": dict(bf16_residual=True),
    "aggressive": dict(aggressive_fusion=True),
    "no-gelu": dict(fused_gelu=False),
    "separate-norm": dict(fused_residual_norm=False),
    "inline-ema": dict(overlap_ema=False),
    "eager-loss": dict(compile_loss=False),
    "cast-weights": dict(bf16_weights=False),
    "blocks-only": dict(compile_ends=False),
    "per-weight-adamw": dict(one_launch=False),
    "no-adamw": dict(skip_adamw=True),
    "no-ema": dict(skip_ema=True),
    "random-init": dict(random_init=True),
    "separate-ema": dict(fused_ema=False),
    "blaslt": dict(blas="cublaslt"),
    "separate-boundaries": dict(fused_boundaries=False),
    "per-layer-mods": dict(stacked_mods=False),
    "fp32-biases": dict(bf16_biases=False),
    "gemm-biases": dict(boundary_biases=False),
    "plain-qkv-grad": dict(fused_qkv_grad=False),
    "triton-boundaries": dict(gluon_boundaries=False),
    "quack-mlp": dict(quack_mlp=True, quack_gemms="fwd+dgrad"),  # as train.py runs it with quack installed
    "quack-epilogues": dict(quack_mlp=True),  # fc1's GELU in quack's epilogues, every other GEMM cuBLAS (the 22nd round's)
    "quack-dgrad": dict(quack_mlp=True, quack_gemms="dgrad"),  # with the input gradients only as quack's
    "quack-gemms": dict(quack_mlp=True, quack_gemms="fwd+dgrad+wgrad"),  # every GEMM of qkv, proj and the MLP as quack's
}
BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def variant(name: str) -> Variant:
    """A variant by name: one of VARIANTS, then any "+modifier"s (e.g. graph-bf16res+whole+muladd-ema)."""
    base, *mods = name.split("+")
    unknown = [m for m in mods if m not in MODIFIERS] + ([base] if base not in VARIANTS else [])
    if unknown:
        raise SystemExit(f"unknown variant part(s) {unknown}: variants {', '.join(VARIANTS)}; modifiers +{', +'.join(MODIFIERS)}")
    return replace(VARIANTS[base], **{k: v for m in mods for k, v in MODIFIERS[m].items()})


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DiT-XL/2")
    p.add_argument("--latent_size", type=int, default=32, help="latent side (256 px / 8)")
    p.add_argument("--batch_sizes", default="32,128")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated; each a variant, then any +modifiers")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compile, autotune)")
    p.add_argument("--profile", default=None, help="print the top GPU kernels of this variant (at the last batch size)")
    p.add_argument("--profile_rows", type=int, default=40, help="how many kernels --profile lists")
    p.add_argument("--time_cap", type=float, default=0, help="seconds: variants not started by then are skipped (0: no cap)")
    p.add_argument("--discard_first", action="store_true",
                   help="run the first variant once more before the table, unreported (the first variant of a process ran ~1%% slower than its repeats)")
    p.add_argument("--attention_bench", action="store_true", help="first time each SDPA backend alone at the model's attention shape")
    p.add_argument("--tiny", action="store_true", help="2-block model, 8x8 latents: a quick check of the script")
    return p.parse_args()


def matmul_peak_tflops(device: torch.device) -> float:
    """bf16 dense matmul throughput of this GPU at 8192^3, measured now."""
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    iters = 20
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12


class DiffusersDiT(nn.Module):
    """diffusers' DiTTransformer2DModel behind our model's call signature, at a registry model's size."""

    def __init__(self, reference: nn.Module):
        super().__init__()
        from diffusers import DiTTransformer2DModel

        heads = reference.num_heads
        self.net = DiTTransformer2DModel(
            num_attention_heads=heads,
            attention_head_dim=reference.hidden_size // heads,
            in_channels=reference.in_channels,
            out_channels=reference.out_channels,
            num_layers=len(reference.blocks),
            sample_size=reference.input_size,
            patch_size=reference.patch_size,
            num_embeds_ada_norm=reference.num_classes,
        )

    def forward(self, x, t, y):
        return self.net(x, timestep=t, class_labels=y, return_dict=False)[0].float()


def model_kwargs(args: argparse.Namespace) -> dict:
    return dict(input_size=args.latent_size, num_classes=1000, **({"depth": 2} if args.tiny else {}))


def forced_attention(backend: str):
    """An attention function running SDPA through this one backend only (an error if it cannot run the shapes)."""

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel([BACKENDS[backend]]):
            return F.scaled_dot_product_attention(q, k, v)

    return attention


def build(name: str, args: argparse.Namespace, device: torch.device) -> nn.Module:
    model = DiT_models[args.model](**model_kwargs(args))
    if name.split("+")[0] == "diffusers":
        model = DiffusersDiT(model)
    model = model.to(device)
    v = variant(name)
    if v.random_init:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1 and not p.any():
                    p.normal_(0.0, 0.02)
    if v.kernels:
        enable_fused_adaln(model)
    if v.flash:
        enable_fast_attention(model)
    if v.attention:
        for module in model.modules():
            if isinstance(module, Attention):
                module.attention_fn = forced_attention(v.attention)
    if v.bf16_residual:
        model.kernels.low_precision_residual = True
    model.kernels.fused_gelu = v.kernels and v.fused_gelu
    model.kernels.fused_boundaries = v.kernels and v.fused_boundaries
    model.kernels.fused_qkv_grad = v.kernels and v.fused_qkv_grad
    model.kernels.quack_mlp = v.kernels and v.fused_boundaries and v.quack_mlp
    model.kernels.quack_gemms = v.quack_gemms
    if not v.stacked_mods:
        model.layer_modulations = lambda c: [layer(c) for layer in model.adaln_layers()]
    if v.compile == "blocks":
        compile_blocks(model, v.compile_mode, ends=v.compile_ends)
    elif v.compile == "model":
        model.compile(mode=v.compile_mode)
    return model.train()


def make_train_step(model: nn.Module, v: Variant):
    """train.py's TrainStep (optionally as a CUDA graph) on one process, behind the bench's step(x, y) signature."""
    params = [p for p in model.parameters() if p.requires_grad]
    cuda = next(model.parameters()).is_cuda
    opt = ShardedAdamW(params, lr=1e-4, weight_decay=0, fused=cuda, foreach=not cuda)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, partial(lr_factor, "constant", 0, 1))
    scaler = torch.amp.GradScaler("cuda" if cuda else "cpu", enabled=False)
    diffusion = create_diffusion(timestep_respacing="")
    if v.compile and v.compile_loss:
        diffusion.compile_losses()
    ema = ShardedEMA(model, lerp=v.ema_lerp)
    guard = DivergenceGuard(next(model.parameters()).device, 5)
    train_step = TrainStep(model, diffusion, opt, scaler, scheduler, ema, ParallelMesh(), v.dtype, v.dtype != torch.float32, 1.0, 0.9999, guard)
    train_step = CudaGraphStep(train_step, overlap_ema=v.overlap_ema, bf16_weights=v.bf16_weights, fused_ema=v.fused_ema) if v.stepper == "graph" else train_step
    if train_step.weights is not None:
        train_step.weights.one_launch = v.one_launch
    if v.skip_adamw and train_step.weights is not None:
        train_step.weights.step = lambda grad_scale, found_inf: None
    if v.skip_ema:
        train_step.ema.begin = train_step.ema.update = train_step.ema.join = lambda *args, **kwargs: None
    return lambda x, y: train_step(x, dict(y=y))


def make_step(model: nn.Module, dtype: torch.dtype, device: torch.device):
    """One training step, returning nothing (no host synchronisation inside)."""
    diffusion = create_diffusion(timestep_respacing="")
    params = [p for p in model.parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0, fused=device.type == "cuda")

    def step(x, y):
        t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = diffusion.training_losses(model, x, t, dict(y=y))["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - 0.9999)

    return step


@contextlib.contextmanager
def knobs(v: Variant):
    """The variant's global switches (bf16 split reductions in cuBLAS, the BLAS library, inductor's coordinate descent),
    restored after."""
    import torch._inductor.config as inductor_config

    try:
        from opendit.kernels import _triton_ops as kernel_ops
        gluon = unittest.mock.patch.object(kernel_ops, "GLUON", kernel_ops.GLUON and v.gluon_boundaries)
    except ImportError:  # no triton: no kernels either
        gluon = contextlib.nullcontext()
    matmul = torch.backends.cuda.matmul
    before, blas = matmul.allow_bf16_reduced_precision_reduction, torch.backends.cuda.preferred_blas_library()
    matmul.allow_bf16_reduced_precision_reduction = v.reduced_precision_reduction
    if v.blas:
        torch.backends.cuda.preferred_blas_library(v.blas)
    try:
        switches = {"coordinate_descent_tuning": v.coordinate_descent, "aggressive_fusion": v.aggressive_fusion}
        if v.persistent_tma:
            switches["triton.enable_persistent_tma_matmul"] = True
        with inductor_config.patch(switches), separate_norm(not v.fused_residual_norm), \
                unittest.mock.patch.object(bf16_weights, "COPIED", bf16_weights.COPIED if v.bf16_biases else ("weight",)), \
                unittest.mock.patch.object(blocks, "without_bias", blocks.without_bias if v.boundary_biases else lambda linear, x: (linear(x), None)), \
                gluon:
            yield
    finally:
        matmul.allow_bf16_reduced_precision_reduction = before
        torch.backends.cuda.preferred_blas_library(blas)


def run(name: str, batch: int, args: argparse.Namespace, device: torch.device, clock_power: ClockPower) -> dict:
    torch.manual_seed(0)
    v = variant(name)
    with knobs(v):
        model = build(name, args, device)
        step = make_step(model, v.dtype, device) if v.stepper == "bench" else make_train_step(model, v)
        x = torch.randn(batch, 4, args.latent_size, args.latent_size, device=device)
        y = torch.randint(0, 1000, (batch,), device=device)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        warmup = max(args.warmup, 4) if v.stepper == "graph" else args.warmup  # the graph is captured at the 4th call
        if device.type == "cuda":  # the peak spans warm-up: a CUDA graph allocates its step's memory at capture
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(warmup):  # compile, autotune and capture happen here
            step(x, y)
        sync()
        warmup_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(x, y)
        sync()
        t1 = time.perf_counter()
        seconds = (t1 - t0) / args.steps
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        reserved = torch.cuda.max_memory_reserved() / 2**30 if device.type == "cuda" else float("nan")
        if args.profile == name:
            profile(step, x, y, args.profile_rows)
    # Warm-up time beyond its steps at the steady rate: compile, autotune, CUDA-graph capture, lazy initialisation.
    mhz, watts = clock_power.mean(t0, t1)
    return dict(img_s=batch / seconds, ms=1000 * seconds, peak=peak, reserved=reserved, compile_s=max(0.0, warmup_s - warmup * seconds), mhz=mhz, watts=watts)


def attention_bench(args: argparse.Namespace, batch: int, device: torch.device) -> None:
    """Each SDPA backend alone at this model's attention shape, bf16, forward and forward + backward: q, k, v
    contiguous (B, H, N, d), and as the model lays them out, views of its qkv projection's (B, N, 3, H, d) output
    (their gradients stacked back into it, as autograd does in the model); where the head dim is not a power of two,
    also with q, k, v zero-padded to wider head dims (the padding and slicing timed too)."""
    with torch.device("meta"):
        probe = DiT_models[args.model](**model_kwargs(args))
    heads, tokens, depth = probe.num_heads, probe.x_embedder.num_patches, len(probe.blocks)
    head_dim = probe.hidden_size // heads
    shape = (batch, heads, tokens, head_dim)
    flops = 4 * batch * heads * tokens**2 * head_dim  # forward; backward ~2.5x
    print(f"\nattention alone, {' x '.join(map(str, shape))} (B x H x N x d), bf16, x {depth} blocks per step:\n")
    print("| SDPA backend | fwd ms | fwd+bwd ms | fwd+bwd TFLOP/s | ms per step (x blocks) |\n|---|---:|---:|---:|---:|")
    q, k, v = (torch.randn(shape, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    qkv = torch.randn(batch, tokens, 3, heads, head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)  # the model's layout
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    padded = [w for w in (80, 96, 128) if w > head_dim] if head_dim & (head_dim - 1) else []

    def packed() -> torch.Tensor:
        """q, k, v as strided (B, H, N, d) views of the packed qkv, as models/attention.py makes them."""
        return F.scaled_dot_product_attention(*qkv.permute(2, 0, 3, 1, 4).unbind(0))

    def attention(width: int) -> torch.Tensor:
        if width == head_dim:
            return F.scaled_dot_product_attention(q, k, v)
        qp, kp, vp = (F.pad(t, (0, width - head_dim)) for t in (q, k, v))  # zeros: same scores, zero extra outputs
        return F.scaled_dot_product_attention(qp, kp, vp, scale=head_dim**-0.5)[..., :head_dim]

    def row(label: str, fn) -> None:
        """One table row: fn()'s forward ms and forward + backward ms, over args.steps calls after 3 untimed ones."""
        times = []
        for backward in (False, True):
            for i in range(3 + args.steps):
                if i == 3:
                    sync()
                    t0 = time.perf_counter()
                out = fn()
                if backward:
                    out.backward(torch.ones_like(out))
            sync()
            times.append(1000 * (time.perf_counter() - t0) / args.steps)
        print(f"| {label} | {times[0]:.3f} | {times[1]:.3f} | {3.5 * flops / times[1] / 1e9:.0f} | {depth * times[1]:.1f} |", flush=True)

    for name in ("cudnn", "flash", "efficient") if device.type == "cuda" else ("math",):
        cases = [(name, partial(attention, head_dim)), (f"{name}, views of packed (B, N, 3, H, d)", packed)]
        cases += [(f"{name}, head dim padded to {w}", partial(attention, w)) for w in padded]
        for label, fn in cases:
            try:
                with sdpa_kernel([BACKENDS[name]]):
                    row(label, fn)
            except RuntimeError as e:
                print(f"| {label} | failed: {str(e).splitlines()[0][:100]} | | | |")

    def materialized(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(d)) v with the (N, N) scores in memory: two batched GEMMs around one softmax."""
        scores = (q * head_dim**-0.5) @ k.transpose(-1, -2)  # (B, H, N, N)
        return scores.float().softmax(-1).to(q.dtype) @ v

    compiled = torch.compile(materialized, fullgraph=True)
    row("materialized scores, eager", lambda: materialized(q, k, v))
    row("materialized scores, compiled", lambda: compiled(q, k, v))
    print()


@contextlib.contextmanager
def separate_norm(on: bool):
    """DiT blocks' gate + residual and the next LayerNorm + modulate as two functions (two kernels) while on."""
    fused = blocks.add_gated_norm_modulate

    def separate(norm, x, gate, y, shift, scale, fused_kernels, bias=None):
        x = blocks.add_gated(x, gate, y if bias is None else y + bias.to(y.dtype), fused_kernels)
        return x, blocks.norm_modulate(norm, x, shift, scale, fused_kernels)

    blocks.add_gated_norm_modulate = separate if on else fused
    try:
        yield
    finally:
        blocks.add_gated_norm_modulate = fused


KERNEL_KINDS = [  # profiler kernel names -> what they do (first match wins)
    ("attention", ("fmha", "cudnn", "flash", "attention")),
    ("optimizer / EMA / clip", ("multi_tensor", "fused_adam", "foreach", "lerp", "_adamw_")),
    ("GEMM", ("gemm", "nvjet", "cutlass", "xmma", "sm90")),
    ("Triton (ours: adaLN, gate + residual, bias + GELU)", ("_adaln_", "_gate_res_", "_bias_gelu_")),
    ("Triton (inductor)", ("triton",)),
]


def profile(step, x, y, rows: int = 40) -> None:
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            step(x, y)
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in kernels)
    print(f"| kernel (top {rows} by GPU time) | calls per step | us per call | ms per step | share |\n|---|---:|---:|---:|---:|")
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:rows]:
        us = e.self_device_time_total
        print(f"| {e.key[:110]} | {e.count / 3:.0f} | {us / e.count:.1f} | {us / 3e3:.2f} | {100 * us / total:.1f}% |")
    shares = {}
    for e in kernels:
        name = e.key.lower()
        kind = next((k for k, words in KERNEL_KINDS if any(w in name for w in words)), "other")
        shares[kind] = shares.get(kind, 0) + e.self_device_time_total
    print("| kernel kind | GPU ms per step | share |\n|---|---:|---:|")
    for kind, us in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {us / 3e3:.1f} | {100 * us / total:.1f}% |")
    stream_gaps(prof, steps=3)


def stream_gaps(prof, steps: int, top: int = 12) -> None:
    """Per CUDA stream: kernels, busy time and idle gaps between consecutive kernels (per step), from the trace; then
    the busiest stream's longest gaps with the kernels around them and its short gaps by the kernel after them, and
    the other streams' kernels of over 50 us (when they start, how long they run)."""
    with tempfile.TemporaryDirectory() as d:
        prof.export_chrome_trace(os.path.join(d, "trace.json"))
        kernels = trace_kernels(trace_events(os.path.join(d, "trace.json")))
    streams: dict = {}
    for start, dur, name, stream in kernels:
        streams.setdefault(stream, []).append((start, dur, name))
    if not streams:
        return
    t0 = min(k[0] for ks in streams.values() for k in ks)
    t1 = max(k[0] + k[1] for ks in streams.values() for k in ks)
    print(f"kernels span {(t1 - t0) / steps / 1e3:.1f} ms per step over {steps} steps")
    print("| stream | kernels per step | busy ms per step | gaps ms per step (< 5 us / 5-50 us / > 50 us) |\n|---|---:|---:|---|")
    for stream, ks in sorted(streams.items(), key=lambda kv: -len(kv[1])):
        ks.sort()
        gaps = [g for g in (b[0] - (a[0] + a[1]) for a, b in zip(ks, ks[1:])) if g > 0]
        short, mid, long = (sum(g for g in gaps if lo <= g < hi) / steps / 1e3 for lo, hi in ((0, 5), (5, 50), (50, 1e12)))
        print(f"| {stream} | {len(ks) / steps:.0f} | {sum(k[1] for k in ks) / steps / 1e3:.1f} | {short:.2f} / {mid:.2f} / {long:.2f} |")
    main = max(streams.values(), key=len)
    gaps = sorted(((b[0] - (a[0] + a[1]), a, b) for a, b in zip(main, main[1:])), key=lambda g: -g[0])[:top]
    print("| longest gaps of the busiest stream (us) | at ms | kernel before | kernel after |\n|---:|---:|---|---|")
    for g, a, b in gaps:
        print(f"| {g:.1f} | {(a[0] + a[1] - t0) / 1e3:.2f} | {a[2][:70]} | {b[2][:70]} |")
    before: dict = {}
    for a, b in zip(main, main[1:]):
        g = b[0] - (a[0] + a[1])
        if 0 < g < 50:
            n, total = before.get(b[2][:70], (0, 0.0))
            before[b[2][:70]] = (n + 1, total + g)
    print("| gaps under 50 us, by the kernel after them | per step | us per step |\n|---|---:|---:|")
    for name, (n, total) in sorted(before.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"| {name} | {n / steps:.0f} | {total / steps:.0f} |")
    for stream, ks in streams.items():
        if ks is not main:
            runs = [f"{(k[0] - t0) / 1e3:.2f}+{k[1] / 1e3:.2f} {k[2][:24]}" for k in ks if k[1] > 50][:8]
            print(f"stream {stream}: kernels over 50 us (start ms + ms): {'; '.join(runs)}")


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if args.tiny:
        args.latent_size, args.steps, args.warmup = 8, 2, 1
    peak = matmul_peak_tflops(device) if device.type == "cuda" else float("nan")
    with torch.device("meta"):
        flops = train_flops_per_sample(DiT_models[args.model](**model_kwargs(args)))
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    rpr = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    print(f"{card}, torch {torch.__version__}; bf16 matmul peak {peak:.0f} TFLOP/s; {args.model} at latent {args.latent_size}: "
          f"{flops / 1e9:.1f} GFLOP per training image; allow_bf16_reduced_precision_reduction={rpr} by default\n")
    names = args.variants.split(",")
    for name in names:
        variant(name)  # unknown names end the run before any work
    batches = [int(b) for b in args.batch_sizes.split(",")]
    start = time.perf_counter()
    clock_power = ClockPower(device)
    if args.attention_bench:
        attention_bench(args, batches[-1], device)
    if args.discard_first:
        print(f"# {names[0]} at batch {batches[0]}: a run to discard", file=sys.stderr, flush=True)
        run(names[0], batches[0], args, device, clock_power)
        torch._dynamo.reset()
    print("| variant | batch | img/s | ms/step | MFU | peak GiB | reserved GiB | compile s | SM MHz | W |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for batch in batches:
        for name in names:
            if args.time_cap and time.perf_counter() - start > args.time_cap:
                print(f"| {name} | {batch} | skipped (time cap) | | | | | | | |", flush=True)
                continue
            print(f"# {name} at batch {batch}: started at {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
            try:
                r = run(name, batch, args, device, clock_power)
            except torch.OutOfMemoryError:
                print(f"| {name} | {batch} | OOM | | | | | | | |", flush=True)
                torch.cuda.empty_cache()
                continue
            except Exception as e:  # a variant that cannot run here (e.g. a capture error) should not end the table
                traceback.print_exc()
                print(f"| {name} | {batch} | failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''} | | | | | | | |", flush=True)
                torch._dynamo.reset()
                continue
            mfu = r["img_s"] * flops / (peak * 1e12)
            cells = [f"{r['img_s']:.1f}", f"{r['ms']:.1f}", f"{100 * mfu:.1f}%", f"{r['peak']:.1f}", f"{r['reserved']:.1f}", f"{r['compile_s']:.0f}", f"{r['mhz']:.0f}", f"{r['watts']:.0f}"]
            print(f"| {name} | {batch} | {' | '.join(cells)} |", flush=True)
            torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    clock_power.close()


if __name__ == "__main__":
    main()
