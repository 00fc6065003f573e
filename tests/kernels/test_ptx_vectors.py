"""Our Triton kernels move their bf16 tiles in 16-byte vectors on Hopper: bench/ptx_vectors.py compiles each for sm90
on this machine (no GPU needed) and counts its global loads and stores by width."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
ROW_LOADS = {"adaLN fwd": 4}  # its BLOCK_M rows' first elements, one 2-byte load each (the LayerNorm's shift)
# Gluon's boundary kernels keep a 128-column tail beside the 1024-column main tile, one column per thread: 2-byte
# accesses there, one per row and tensor, against one 16-byte vector per row and tensor in the main tile.
TWO_TILES = ("boundary fwd (Gluon)", "boundary bwd (Gluon)")


def can_compile_for_hopper() -> bool:
    """Triton with its NVIDIA backend and the ptxas it ships (the CPU wheels of torch come without triton)."""
    try:
        import triton
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends and os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


@pytest.fixture(scope="module")
def widths() -> dict:
    if not can_compile_for_hopper():
        pytest.skip("needs triton with its NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "ptx_vectors.py"), "--json"], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


def test_every_kernel_compiles_to_vector_loads_and_stores(widths):
    assert len(widths) >= 9
    from opendit.kernels import _triton_ops

    assert _triton_ops._gluon is None or set(TWO_TILES) <= set(widths)
    for name, counts in widths.items():
        assert counts["ld"].get("v4.b32", 0) > 0 and counts["st"].get("v4.b32", 0) > 0, (name, counts)
        if name in TWO_TILES:  # the tail is 1/8 of the main tile: no more 2-byte accesses than 16-byte ones
            assert all(counts[op].get("b16", 0) <= counts[op]["v4.b32"] for op in ("ld", "st")), (name, counts)
            continue
        assert counts["ld"].get("b16", 0) <= ROW_LOADS.get(name, 0), (name, counts)  # no 2-byte loads on the tiles
        assert "b16" not in counts["st"] and "b8" not in counts["st"], (name, counts)  # nor 2- or 1-byte stores (float8)
