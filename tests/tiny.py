"""Helpers for tiny test models (tests/conftest.py puts tests/ on sys.path)."""
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
