"""Run the Triton kernels under the interpreter (CPU) when there is no CUDA GPU."""

import importlib
import os
import sys

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    # Triton reads this when each `@triton.jit` runs: set it before the kernels module is imported.
    os.environ["TRITON_INTERPRET"] = "1"
    _ops = sys.modules.get("opendit.kernels._triton_ops")
    if _ops is not None and not _ops.INTERPRET:  # imported earlier in this session: define the kernels again
        importlib.reload(_ops)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_autotune_for_small_tests(request, monkeypatch):
    """On GPU, tests not marked `gpu` use the heuristic config (autotuning every tiny shape only costs time)."""
    if torch.cuda.is_available() and request.node.get_closest_marker("gpu") is None:
        from opendit.kernels import _triton_ops

        monkeypatch.setattr(_triton_ops, "AUTOTUNE", False)
