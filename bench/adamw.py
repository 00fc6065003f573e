"""GPU time of one optimizer step over a DiT's matmul weights: torch's fused AdamW (fp32 gradients, a clip divisor)
against our AdamW on fp32 masters that also writes their bf16 copies (kernels/adamw.py), per launch config: one
launch per weight, and one launch over all of them (MultiTensorAdamW), also with the EMA in the pass.

    python bench/adamw.py [--models DiT-B/2,DiT-XL/2] [--configs 1024x4,2048x8,4096x8,4096x16]

Each update is captured in a CUDA graph (as in the training step) and replayed (bench/timing.py graphed_us).
TB/s counts the bytes each must move: 32 per parameter for torch's (it writes the unscaled gradient back), 28 for ours,
36 with the EMA.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from opendit.kernels import _triton_ops  # noqa: E402
from opendit.kernels.adamw import MultiTensorAdamW, adamw_scalars  # noqa: E402
from opendit.models import DiT_models  # noqa: E402
from opendit.training.bf16_weights import Bf16Weights  # noqa: E402
from timing import graphed_us  # noqa: E402  (bench/timing.py)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="DiT-B/2,DiT-XL/2")
    p.add_argument("--configs", default="1024x4,2048x8,4096x8,4096x16", help="BLOCKxnum_warps of our kernel")
    args = p.parse_args()
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    print("| model | weights (M params) | update | ms per step | TB/s |\n|---|---:|---|---:|---:|")
    for name in args.models.split(","):
        model = DiT_models[name](input_size=32).to(device)
        opt = torch.optim.AdamW(list(model.parameters()), lr=1e-4, weight_decay=0.0, fused=True, capturable=True)
        weights = Bf16Weights(model, opt)
        masters = [w.detach() for w in weights.masters]
        n = sum(w.numel() for w in masters)
        grads16 = [torch.randn_like(w, dtype=torch.bfloat16) for w in masters]
        grads32 = [g.float() for g in grads16]
        m, v = [torch.zeros_like(w) for w in masters], [torch.zeros_like(w) for w in masters]
        steps = [torch.zeros((), device=device) for _ in masters]
        divisor, found_inf = torch.tensor(1.5, device=device), torch.zeros((), device=device)
        lr = torch.tensor(1e-4, device=device)

        def torch_fused():
            torch._foreach_add_(steps, 1)
            torch._fused_adamw_(masters, grads32, m, v, [], steps, lr=lr, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8,
                                amsgrad=False, maximize=False, grad_scale=divisor, found_inf=found_inf)

        def ours(block, warps):
            def fn():
                torch._foreach_add_(steps, 1)
                s = adamw_scalars(lr, steps[0], 0.9, 0.999, divisor, found_inf)
                for w, g, mm, vv, c in zip(masters, grads16, m, v, weights.copies):
                    _triton_ops.adamw_master_(w, g, mm, vv, c.detach(), s, 0.9, 0.999, 0.0, 1e-8, block=block, warps=warps)
            return fn

        emas = [w.clone() for w in masters]

        def one_launch(block, warps, with_ema):
            launch = MultiTensorAdamW([w.numel() for w in masters], device, block, warps)
            tensors = [(w, g, mm, vv, c.detach(), e if with_ema else None) for w, g, mm, vv, c, e in zip(masters, grads16, m, v, weights.copies, emas)]

            def fn():
                torch._foreach_add_(steps, 1)
                launch(tensors, adamw_scalars(lr, steps[0], 0.9, 0.999, divisor, found_inf), 0.9, 0.999, 0.0, 1e-8, 1e-4)
            return fn

        rows = [("torch fused AdamW, fp32 gradients", torch_fused, 32)]
        for config in args.configs.split(","):
            block, warps = (int(x) for x in config.split("x"))
            rows.append((f"ours, bf16 gradients + copies, BLOCK {block}, {warps} warps", ours(block, warps), 28))
            rows.append((f"ours, one launch, BLOCK {block}, {warps} warps", one_launch(block, warps, False), 28))
            rows.append((f"ours, one launch + EMA, BLOCK {block}, {warps} warps", one_launch(block, warps, True), 36))
        for label, fn, nbytes in rows:
            ms = graphed_us(fn) / 1000
            print(f"| {name} | {n / 1e6:.1f} | {label} | {ms:.3f} | {nbytes * n / ms / 1e9:.2f} |")


if __name__ == "__main__":
    main()
