"""The MLP's fc1 + bias + tanh GELU, and its gradient, inside quack's CuTe-DSL GEMM epilogues (Hopper, `pip install quack-kernels`).

Forward: one GEMM writes fc1's pre-activation (kept for the backward) and its GELU (fc2's input).
Backward: fc2's input-gradient GEMM multiplies by GELU's derivative and sums fc1's bias gradient in its epilogue.
Against fc1's GEMM + kernels/fused_gelu.py's Triton passes this saves two reads and two writes of the (rows, hidden)
activations a block. Rounding: the bias is added to the fp32 accumulator before the pre-activation is rounded to bf16;
GELU and its derivative in fp32. The other GEMMs run as quack's plain GEMM where `gemms` names their kind (training:
forwards and input gradients, where quack's default config beat cuBLAS on an H200), else cuBLAS (weight gradients).
"""
import functools
import importlib.util
import os
from typing import Optional

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def is_available(x: Tensor) -> bool:
    """True for a CUDA tensor on a Hopper (sm90) GPU with quack installed."""
    return x.is_cuda and torch.cuda.get_device_capability(x.device)[0] == 9 and importlib.util.find_spec("quack") is not None


def _compat() -> None:
    """quack 0.6.5 fingerprints whatever an epilogue's functions reference and refuses types it does not know; the op
    wrappers of nvidia-cutlass-dsl 4.8 reference a ContextVar and code-object methods, which carry no maths: key
    those by their type."""
    from quack.gemm_runtime import identity

    if getattr(identity, "_opendit_compat", False):
        return
    original = identity.semantic_value_key

    def semantic_value_key(value, seen):
        try:
            return original(value, seen)
        except TypeError:
            return ("opaque", type(value).__module__, type(value).__qualname__, getattr(value, "name", None))

    identity.semantic_value_key, identity._opendit_compat = semantic_value_key, True


def _config():
    """quack's GemmConfig from OPENDIT_QUACK_CONFIG ("128x192p2x1": tile M x N, p(ingpong) or c(ooperative), cluster
    M x N), else quack's default for the GPU; None when unset."""
    spec = os.environ.get("OPENDIT_QUACK_CONFIG", "")
    if not spec:
        return None
    from quack.gemm_config import GemmConfig

    tiles, kind, cluster = spec.partition("p") if "p" in spec else spec.partition("c")
    tile_m, tile_n = map(int, tiles.split("x"))
    cluster_m, cluster_n = map(int, cluster.split("x"))
    return GemmConfig(tile_m=tile_m, tile_n=tile_n, pingpong=kind == "p", cluster_m=cluster_m, cluster_n=cluster_n,
                      is_dynamic_persistent=False, device_capacity=9)


@torch.library.custom_op("opendit::quack_fc1_gelu", mutates_args=())
def fc1_gelu(x: Tensor, w1: Tensor, b1: Tensor) -> tuple[Tensor, Tensor]:
    """(x w1^T + b1, gelu_tanh(x w1^T + b1)) for x (rows, in), w1 (hidden, in): one GEMM."""
    _compat()
    from quack.gemm_interface import gemm_act

    config = _config()
    return gemm_act(x, w1.t(), bias=b1, activation="gelu_tanh_approx", config=config, tuned=False)


@fc1_gelu.register_fake
def _(x, w1, b1):
    return x.new_empty(x.shape[0], w1.shape[0]), x.new_empty(x.shape[0], w1.shape[0])


@torch.library.custom_op("opendit::quack_dgelu", mutates_args=())
def dgelu_dbias(dz: Tensor, w2: Tensor, pre: Tensor) -> tuple[Tensor, Tensor]:
    """(d pre, d b1) from fc2's output gradient dz (rows, out), w2 (out, hidden) and fc1's pre-activation: one GEMM."""
    _compat()
    from opendit.kernels._quack_epilogues import dgelu_dbias as epilogue

    out = epilogue(dz, w2, pre, config=_config(), tuned=False)
    dbias = out["dbias"].float()
    return out["D"], dbias.reshape(-1) if dbias.numel() == pre.shape[1] else dbias.reshape(-1, pre.shape[1]).sum(0)


@dgelu_dbias.register_fake
def _(dz, w2, pre):
    return torch.empty_like(pre), pre.new_empty(pre.shape[1], dtype=torch.float32)


@torch.library.custom_op("opendit::quack_mm", mutates_args=())
def quack_mm(a: Tensor, b: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """a @ b (+ bias, a row vector) as quack's plain GEMM (its default config)."""
    _compat()
    from quack.gemm_interface import gemm

    return gemm(a, b, bias=bias, tuned=False)


@quack_mm.register_fake
def _(a, b, bias=None):
    return a.new_empty(a.shape[0], b.shape[1])


def mm(kind: str, gemms: str):
    """quack's plain GEMM where kind ("dgrad" or "wgrad") is among gemms ("fwd+dgrad", ...), else torch.mm."""
    return quack_mm if kind in gemms.split("+") else torch.mm


def autocast_dtype(*tensors: Tensor) -> tuple:
    """tensors (or None) in the CUDA autocast dtype where autocast is on (the custom functions below run with it off)."""
    if not torch.is_autocast_enabled("cuda"):
        return tensors
    dt = torch.get_autocast_dtype("cuda")
    return tuple(None if t is None else t.to(dt) for t in tensors)


def _quack_linear_forward(x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    """F.linear(x, w, b) as quack's GEMM, the bias in its epilogue, in the autocast dtype (forward only)."""
    x, w, b = autocast_dtype(x, w, b)
    return quack_mm(x.reshape(-1, x.shape[-1]), w.t(), b).view(*x.shape[:-1], w.shape[0])  # (rows, in) -> (..., out)


def linear(gemms: str):
    """F.linear, or quack's GEMM where gemms names "fwd" (inside an autograd function that owns the backward)."""
    return _quack_linear_forward if "fwd" in gemms.split("+") else F.linear


class QuackMlpFunction(torch.autograd.Function):
    """fc2(gelu_tanh(fc1(x))) without fc2's bias, the GELU inside quack's GEMM epilogues; gemms: which of the other
    four GEMMs (fc2's forward "fwd", fc1's input gradient "dgrad", both weight gradients "wgrad") are quack's too."""

    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, gemms: str) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (rows, in)
        pre, h = fc1_gelu(x2, w1, b1)  # (rows, hidden) each
        ctx.save_for_backward(x2, w1, w2, pre, h)
        ctx.bias_dtype, ctx.gemms = b1.dtype, gemms
        return linear(gemms)(h, w2, None).view(*x.shape[:-1], w2.shape[0])

    @staticmethod
    def backward(ctx, dz: Tensor):
        x2, w1, w2, pre, h = ctx.saved_tensors
        dz2 = dz.reshape(-1, dz.shape[-1])  # (rows, out)
        dpre, db1 = dgelu_dbias(dz2, w2, pre)
        dx = mm("dgrad", ctx.gemms)(dpre, w1).view(*dz.shape[:-1], w1.shape[1])
        wgrad = mm("wgrad", ctx.gemms)
        return dx, wgrad(dpre.t(), x2), db1.to(ctx.bias_dtype), wgrad(dz2.t(), h), None


class QuackLinearFunction(torch.autograd.Function):
    """x W^T without a bias and its two gradients, each as quack's plain GEMM where gemms names it, else cuBLAS."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, gemms: str) -> Tensor:
        ctx.save_for_backward(x.reshape(-1, x.shape[-1]), w)  # x as (rows, in)
        ctx.gemms = gemms
        return linear(gemms)(x, w, None)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x2, w = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])  # (rows, out)
        return mm("dgrad", ctx.gemms)(dy2, w).view(*dy.shape[:-1], w.shape[1]), mm("wgrad", ctx.gemms)(dy2.t(), x2), None


def quack_linear(x: Tensor, w: Tensor, gemms: str = "fwd+dgrad+wgrad") -> Tensor:
    """x W^T (no bias) in the autocast dtype, the GEMMs named in gemms as quack's (KernelChoice.quack_gemms)."""
    x, w = autocast_dtype(x, w)
    with torch.autocast("cuda", enabled=False):
        return QuackLinearFunction.apply(x, w, gemms)


def quack_mlp(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, gemms: str = "") -> Tensor:
    """fc2's GEMM of gelu_tanh(x w1^T + b1), without fc2's bias: (..., in) -> (..., out), in the autocast dtype.
    gemms: which other GEMMs run as quack's ("fwd+dgrad" in training; "fwd+dgrad+wgrad": all, bench/train_step.py +quack-gemms)."""
    x, w1, b1, w2 = autocast_dtype(x, w1, b1, w2)
    with torch.autocast("cuda", enabled=False):
        return QuackMlpFunction.apply(x, w1, b1, w2, gemms)


@functools.cache
def self_test(device: torch.device) -> Optional[str]:
    """None when the path runs on `device` and matches PyTorch (fp32) on a small problem, output and gradients; else
    why not, in one line (quack's JIT compile, a cutlass-dsl version it does not know, a wrong result)."""
    try:
        g = torch.Generator(device=device).manual_seed(0)
        shapes = {"x": (256, 128), "w1": (512, 128), "b1": (512,), "w2": (128, 512)}
        leaves = {k: (torch.randn(v, device=device, generator=g) * (0.1 if k != "x" else 1)).bfloat16().requires_grad_() for k, v in shapes.items()}
        dz = torch.randn(256, 128, device=device, generator=g).bfloat16()
        with torch.enable_grad():
            z = quack_mlp(*leaves.values(), gemms="fwd+dgrad")  # as training runs it: the plain GEMMs too
            z.backward(dz)
        ref = {k: t.detach().float().requires_grad_() for k, t in leaves.items()}
        with torch.enable_grad():
            z_ref = F.gelu(ref["x"] @ ref["w1"].t() + ref["b1"], approximate="tanh") @ ref["w2"].t()
            z_ref.backward(dz.float())
        pairs = [("output", z, z_ref)] + [(f"{k}'s gradient", leaves[k].grad, ref[k].grad) for k in shapes]
        for name, got, want in pairs:
            err = ((got.float() - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()
            if not err <= 3e-2:
                return f"its {name} differs from PyTorch's by {err:.1e} of the largest value"
    except Exception as e:  # an optional accelerator: any failure means "not here"
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
    return None
