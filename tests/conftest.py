"""Fixtures shared by the whole suite."""
import socket

import pytest


@pytest.fixture
def no_network(monkeypatch):
    """Fail any attempt to open a network connection (for tests that load models: nothing may download)."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
