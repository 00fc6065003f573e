"""Exploration (python bench/sample_compile_scope.py): compile scope for the fast path (per block vs whole model), with/without fused kernels. 250 DDPM, 8 img + CFG."""
import os, sys, time
import torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sample import flags, build, timed_loop  # noqa
from opendit.sampling.denoise import _ENGINES  # noqa
dev = torch.device("cuda")
torch.backends.cuda.matmul.allow_tf32 = True
import torch._inductor.config as ic
for name, kernels, scope, mode in [("blocks, no fused kernels", False, "blocks", None), ("whole model, fused kernels", True, "model", None),
                                   ("whole model, no fused kernels", False, "model", None), ("whole model, no kernels, max-autotune-no-cudagraphs", False, "model", "max-autotune-no-cudagraphs")]:
    args = flags("bf16", True, kernels, scope == "blocks")
    model = build(args if scope == "blocks" else flags("bf16", True, kernels, False), "DiT-XL/2", 256, dev)
    if scope == "model":
        model.forward = torch.compile(model.forward, mode=mode)
        args.compile = True
    try:
        first, second = timed_loop(args, model, 8, (4, 32, 32), dev)
        print(f"| {name} | {second:.2f} | {first:.1f} |", flush=True)
        if name.startswith("whole model, no fused kernels"):
            a = flags("bf16", True, kernels, True, cfg_scale=1.5, num_sampling_steps=25); a.compile = True
            _, s = timed_loop(a, model, 64, (4, 32, 32), dev); print(f"  ddp batch 64: {64 / (s * 10):.2f} img/s", flush=True)
    except Exception as e:
        print(name, "failed", type(e).__name__, str(e)[:300], flush=True)
    _ENGINES.clear(); del model; torch.cuda.empty_cache()
