"""Where DiT's attention time goes with q, k, v as views of the packed qkv projection.

cuDNN SDPA forward + backward at a model's attention shape, bf16, with the gradient carried back into the tensor
the inputs came from (so any stacking or copying of dq, dk, dv is timed too):

  contiguous       q, k, v separate (B, H, N, d) leaves: no layout work at all
  tokens-major     q, k, v separate (B, N, H, d) leaves seen as (B, H, N, d): the layout of three projections
  packed           views of one (B, N, 3, H, d) leaf, as models/attention.py makes them (autograd stacks the grads)
  packed, one copy the same views through an autograd Function whose backward stacks dq, dk, dv straight into the
                   packed layout (one copy kernel)
  packed, compiled the packed case under torch.compile (inductor writes the backward's copies)
  packed, one copy, compiled  the same with the autograd Function

Then the packed case's CUDA kernels by total time (torch.profiler), to show what its backward adds.

    python bench/attention_layout.py                   # DiT-XL/2 and DiT-B/2 at 256 px, batch 128 and 64
    python bench/attention_layout.py --shapes 8x16x256x72
"""
import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


class PackedViews(torch.autograd.Function):
    """(B, N, 3, H, d) -> three (B, H, N, d) views; the backward writes the three grads into one packed tensor."""

    @staticmethod
    def forward(ctx, qkv):
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        return torch.stack([g.transpose(1, 2) for g in (dq, dk, dv)], dim=2)  # (B, N, 3, H, d) in one kernel


def cases(B: int, H: int, N: int, d: int, device: torch.device) -> dict:
    """name -> (leaf tensors, forward function returning the attention output)."""
    new = dict(device=device, dtype=torch.bfloat16, requires_grad=True)
    heads_major = [torch.randn(B, H, N, d, **new) for _ in range(3)]
    tokens_major = [torch.randn(B, N, H, d, **new) for _ in range(3)]
    packed = torch.randn(B, N, 3, H, d, **new)

    def packed_autograd(qkv):
        return F.scaled_dot_product_attention(*qkv.permute(2, 0, 3, 1, 4).unbind(0))

    def packed_one_copy(qkv):
        return F.scaled_dot_product_attention(*PackedViews.apply(qkv))

    compiled = torch.compile(packed_autograd, fullgraph=True)
    compiled_one_copy = torch.compile(packed_one_copy, fullgraph=True)
    return {
        "contiguous": (heads_major, lambda: F.scaled_dot_product_attention(*heads_major)),
        "tokens-major": (tokens_major, lambda: F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in tokens_major))),
        "packed": ([packed], lambda: packed_autograd(packed)),
        "packed, one copy": ([packed], lambda: packed_one_copy(packed)),
        "packed, compiled": ([packed], lambda: compiled(packed)),
        "packed, one copy, compiled": ([packed], lambda: compiled_one_copy(packed)),
    }


def timed(fn, leaves, steps: int, backward: bool) -> float:
    """ms per call of fn (and its backward), after 3 untimed calls."""
    for i in range(3 + steps):
        if i == 3:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        out = fn()
        if backward:
            out.backward(torch.ones_like(out))
            for t in leaves:
                t.grad = None
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t0) / steps


def kernels(fn, leaves, rows: int) -> None:
    """The CUDA kernels of one forward + backward, by total time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            out = fn()
            out.backward(torch.ones_like(out))
            for t in leaves:
                t.grad = None
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:rows]
    print("| kernel | calls | ms per fwd+bwd |\n|---|---:|---:|")
    for e in events:
        print(f"| {e.key[:90]} | {e.count // 5} | {e.device_time_total / 5 / 1000:.3f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["128x16x256x72", "64x12x256x64"], help="B x H x N x d (XL/2 and B/2 by default)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--profile_rows", type=int, default=8)
    args = p.parse_args()
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN SDPA, bf16")
    for shape in args.shapes:
        B, H, N, d = map(int, shape.split("x"))
        print(f"\n{B} x {H} x {N} x {d} (B x H x N x d):\n")
        print("| layout | fwd ms | fwd+bwd ms |\n|---|---:|---:|")
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            table = cases(B, H, N, d, device)
            for name, (leaves, fn) in table.items():
                print(f"| {name} | {timed(fn, leaves, args.steps, False):.3f} | {timed(fn, leaves, args.steps, True):.3f} |", flush=True)
            for name in ("packed, compiled", "packed, one copy, compiled"):
                print(f"\n{name}:\n")
                kernels(table[name][1], table[name][0], args.profile_rows)


if __name__ == "__main__":
    main()
