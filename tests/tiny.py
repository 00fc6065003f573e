"""Helpers for tiny test models (tests/conftest.py puts tests/ on sys.path)."""
import os

import torch


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Replace the adaLN-Zero init (which makes every block the identity and zeroes most gradients) by small random
    weights, in float64."""
    gen = torch.Generator().manual_seed(seed)
    model.double()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def tiny_step(device: torch.device, precision: torch.dtype = torch.float32, fused=None):
    """A TrainStep of a 2-block DiT on 8x8 latents (10 classes): fused AdamW on CUDA, foreach on the CPU (fused=True:
    the CPU's fused AdamW, as the GPU steps), an LR that changes every step, clipping at 1.0 and an EMA."""
    from functools import partial

    from opendit.diffusion import create_diffusion
    from opendit.models import DiT
    from opendit.parallel.mesh import ParallelMesh
    from opendit.training.ema import ShardedEMA
    from opendit.training.guard import DivergenceGuard
    from opendit.training.optim import ShardedAdamW, lr_factor
    from opendit.training.step import TrainStep

    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10, class_dropout_prob=0.0).to(device)
    for p in model.parameters():  # non-zero output layers, so every parameter gets a gradient from the first step
        p.data.add_(0.01 * torch.randn_like(p))
    fused = device.type == "cuda" if fused is None else fused
    opt = ShardedAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, fused=fused, foreach=not fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, partial(lr_factor, "cosine", 2, 8))  # the LR changes every step
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    return TrainStep(model.train(), create_diffusion(""), opt, scaler, scheduler, ShardedEMA(model), ParallelMesh(), precision, precision != torch.float32, 1.0, 0.9, DivergenceGuard(device, 5))


def run_steps(step, steps: int = 7) -> tuple:
    """`steps` seeded steps of `step`: (losses, LRs, the weights after, the EMA after)."""
    torch.manual_seed(1)
    device = next(step.model.parameters()).device
    data = [(torch.randn(4, 4, 8, 8, device=device), torch.randint(0, 10, (4,), device=device)) for _ in range(steps)]
    torch.manual_seed(2)
    results = [step(x, {"y": y}) for x, y in data]
    losses = torch.stack([r.loss_dict["loss"].mean() for r in results]).cpu()
    return losses, [r.lr for r in results], [p.detach().clone() for p in step.model.parameters()], [e.clone() for e in step.ema.state_dict().values()]


# A pixel-space DiT-S/2 of one block at 16 px (10 classes) as sample.py / sample_ddp.py read it: random weights, built in milliseconds.
TINY_SAMPLING_CONFIG = dict(model="DiT-S/2", input_size=16, in_channels=3, num_classes=10, depth=1, hidden_size=32, num_heads=2)
TINY_SAMPLING_ARGS = dict(model="DiT-S/2", vae="none", image_size=16, num_classes=10, noise_schedule="linear")


def tiny_checkpoint(path, config=TINY_SAMPLING_CONFIG, args=TINY_SAMPLING_ARGS, seed: int = 0, plain: bool = False) -> str:
    """Save {"ema", "model", "config"} (plain: a bare state dict, as Meta's released .pt) of random weights at path; -> path."""
    from opendit.builders import build_model

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.manual_seed(seed)
    state = {k: 0.05 * torch.randn_like(v) for k, v in build_model(config).state_dict().items()}
    torch.save(state if plain else {"ema": state, "model": {k: v + 0.01 for k, v in state.items()}, "config": {"model": config, "args": args}}, path)
    return str(path)
