"""A scale-free closeness check for kernel tests (tests/conftest.py puts tests/ on sys.path)."""
import torch


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    """Same shape, finite, and max |actual - expected| <= tol * max |expected|, compared in float64."""
    assert actual.shape == expected.shape, what
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual.double() - expected.double()).abs().max().item()
    bound = tol * max(expected.abs().max().item(), 1e-30)
    assert err <= bound, f"{what}: max error {err:.3e} > {bound:.3e}"
