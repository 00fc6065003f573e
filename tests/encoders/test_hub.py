"""Hub ids fail fast without network (HF_HUB_OFFLINE unset): the cache first, a 3-second probe, then one line."""
import socket
import time

import pytest

from opendit.encoders import hub
from opendit.encoders.text import build_text_encoder
from opendit.checkpoint.weights import _download_official
from opendit.errors import CheckpointError


@pytest.fixture
def offline_machine(monkeypatch, tmp_path):
    """No network at all and an empty hub cache; HF_HUB_OFFLINE is not set."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))

    def refuse(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_default_text_encoder_fails_fast_with_one_line(offline_machine):
    start = time.time()
    with pytest.raises(ValueError) as info:
        build_text_encoder("openai/clip-vit-base-patch32")
    assert time.time() - start < 30
    message = str(info.value)
    assert "\n" not in message and "openai/clip-vit-base-patch32" in message and "pass a local folder" in message


def test_probe_says_unreachable_and_honours_offline_flag(offline_machine, monkeypatch):
    assert not hub.reachable("https://huggingface.co")
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: socket.socket())  # "reachable"
    assert hub.reachable("https://huggingface.co")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not hub.reachable("https://huggingface.co")


def test_official_checkpoint_download_fails_fast(offline_machine, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="cannot be reached; pass a local checkpoint path"):
        _download_official("DiT-XL-2-256x256.pt")
    assert not (tmp_path / "pretrained_models").exists()


def test_local_folder_skips_the_probe(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(hub, "reachable", lambda url: calls.append(url) or False)
    assert hub.load_local_or_hub(lambda local_only: ("loaded", local_only), str(tmp_path), "--vae x", "a VAE") == ("loaded", False)
    assert calls == []
