"""Fixtures for the data tests: real video files written with PyAV, image trees, a tiny VAE and CLIP on disk; no network."""

import os
import socket
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Fail any attempt to open a network connection (local Unix sockets, which DataLoader workers use, stay allowed)."""
    connect = socket.socket.connect

    def local_only(sock, address):
        if sock.family != socket.AF_UNIX:
            raise AssertionError("network access attempted in a test")
        return connect(sock, address)

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted in a test")

    monkeypatch.setattr(socket.socket, "connect", local_only)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def encode_video(path, frames: int, width: int, height: int, fps: float = 24, codec: str = "libx264", pix_fmt: str = "yuv420p",
                 gop: int = 12) -> str:
    """A video whose frame k is flat with red 10 + 8 * (k % 30) and green 10 + 8 * (k // 30), so frames can be identified."""
    import av

    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt, stream.gop_size = width, height, pix_fmt, gop
        stream.bit_rate = 4_000_000  # near-lossless: frame numbers must survive the codec
        stream.options = {"qmin": "0", "qmax": "8"} if codec == "libvpx" else {}
        for k in range(frames):
            rgb = np.zeros((height, width, 3), np.uint8)
            rgb[..., 0], rgb[..., 1], rgb[..., 2] = 10 + 8 * (k % 30), 10 + 8 * (k // 30), 128
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())
    return str(path)


def frame_ids(clip) -> list:
    """Frame numbers of a decoded clip: uint8 (T, H, W, 3) or float (3, T, H, W) in [-1, 1]."""
    clip = torch.as_tensor(clip)
    if clip.is_floating_point():
        clip = ((clip.movedim(0, -1) + 1) * 127.5).round()
    centre = clip[:, clip.shape[1] // 2, clip.shape[2] // 2].float()  # (T, 3)
    return [round((float(r) - 10) / 8) + 30 * round((float(g) - 10) / 8) for r, g, _ in centre]


def write_image(path, width: int, height: int, value: int = 0) -> str:
    """An RGB PNG/JPEG with a horizontal ramp (so flips are visible)."""
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    arr = np.broadcast_to(ramp, (height, width, 3)).astype(np.uint8).copy()
    arr[..., 2] = value
    Image.fromarray(arr).save(str(path))
    return str(path)


@pytest.fixture(scope="session")
def vae_dir(tmp_path_factory):
    """A tiny random diffusers AutoencoderKL saved to a folder (--vae PATH), downsampling 2."""
    from opendit.encoders.vae import tiny_vae

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vae") / "tiny"
    tiny_vae().model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    """A tiny random CLIP text model with a character tokenizer (--text_encoder PATH), 16-d."""
    from opendit.encoders.text import tiny_text_encoder

    return tiny_text_encoder(str(tmp_path_factory.mktemp("clip") / "tiny"), hidden_size=16)


@pytest.fixture(scope="session")
def media():
    """The helpers above, for tests: media.video(...), media.image(...), media.ids(clip)."""

    class Media:
        video, image, ids = staticmethod(encode_video), staticmethod(write_image), staticmethod(frame_ids)

    return Media
