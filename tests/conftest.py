"""Fixtures shared by the whole suite."""
import os
import socket
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/ranks.py, shared with nccl_equivalence.py
import ranks  # noqa: E402


@pytest.fixture(scope="session")
def dt():
    """Multi-process helpers (gloo ranks, a tiny DiT, fixed batches, train.py flags): see tests/ranks.py."""
    return ranks.helpers()


@pytest.fixture
def no_network(monkeypatch):
    """Fail any attempt to open a network connection (for tests that load models: nothing may download)."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` skip cleanly where there is no CUDA device (`pytest` run without `-m "not gpu"`)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (make test-gpu on the GPU machine)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
