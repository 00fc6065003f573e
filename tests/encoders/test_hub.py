"""Hub ids fail fast without network (HF_HUB_OFFLINE unset): the cache first, a 3-second HTTP probe, then one line;
and against local endpoints that never answer, answer 404, or stall after the probe."""
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from opendit.checkpoint.weights import _download_official
from opendit.encoders import hub
from opendit.encoders.text import build_text_encoder
from opendit.encoders.vae import build_vae
from opendit.errors import CheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
    problem = hub.probe("https://huggingface.co")
    assert problem.startswith("cannot be reached (") and "\n" not in problem
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.probe("https://huggingface.co") == "cannot be reached (HF_HUB_OFFLINE is set)"


def test_official_checkpoint_download_fails_fast(offline_machine, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"dl.fbaipublicfiles.com cannot be reached \(.*\); pass a local checkpoint path"):
        _download_official("DiT-XL-2-256x256.pt")
    assert not (tmp_path / "pretrained_models").exists()


def test_local_folder_skips_the_probe(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(hub, "probe", lambda url: calls.append(url) or "cannot be reached")
    assert hub.load_local_or_hub(lambda local_only: ("loaded", local_only), str(tmp_path), "--vae x", "a VAE") == ("loaded", False)
    assert calls == []


@contextmanager
def endpoint(kind: str):
    """A hub endpoint on 127.0.0.1: "silent" accepts connections and never answers, "missing" answers 404 to
    everything, "stalls" answers the first request for a model (the probe) and then none (other paths: 200). Yields its URL."""
    if kind == "silent":
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            sock.listen(16)  # the kernel completes the handshakes; nothing reads or answers
            yield f"http://127.0.0.1:{sock.getsockname()[1]}"
        return
    done, requests = threading.Event(), []

    class Handler(BaseHTTPRequestHandler):
        def do_HEAD(self):
            requests.append(self.path)
            if kind == "stalls" and sum("/org/" in r for r in requests) > 1:
                done.wait(60)
                return
            self.send_response(404 if kind == "missing" else 200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        done.set()
        server.shutdown()
        server.server_close()


@pytest.fixture
def local_hub(monkeypatch, tmp_path):
    """An empty hub cache, no proxy for 127.0.0.1, HF_HUB_OFFLINE unset; returns a function pointing the hub at a URL."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def point_at(url: str) -> None:  # what HF_ENDPOINT=url does when set before huggingface_hub is imported
        monkeypatch.setattr(constants, "ENDPOINT", url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")

    return point_at


LOADERS = {"--vae": lambda repo: build_vae(repo), "--text_encoder": lambda repo: build_text_encoder(repo)}


def load_failure(local_hub, kind: str, flag: str) -> tuple:
    """(endpoint, error message, seconds) of loading org/model with `flag` from a local endpoint of this kind."""
    with endpoint(kind) as url:
        local_hub(url)
        start = time.time()
        with pytest.raises(ValueError) as info:
            LOADERS[flag]("org/model")
        return url, str(info.value), time.time() - start


@pytest.mark.timeout(60)
@pytest.mark.parametrize("flag", LOADERS)
@pytest.mark.parametrize("kind, problem", [("silent", "cannot be reached (no answer within 3 s)"), ("missing", "answered HTTP 404 for {url}/org/model/resolve/main/config.json")])
def test_endpoint_that_never_answers_or_404s_fails_in_seconds(local_hub, flag, kind, problem):
    url, message, elapsed = load_failure(local_hub, kind, flag)
    assert message.startswith(f"{flag} org/model: not in the local cache and the hub ({url}) {problem.format(url=url)}; pass a local folder"), message
    # the 3 s probe, plus huggingface_hub's own 3 s fetch of {endpoint}/api/agent-harnesses once per process (its user agent)
    assert "\n" not in message and elapsed < 10, (message, elapsed)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("flag", LOADERS)
def test_download_that_stalls_after_the_probe_fails_without_retries(local_hub, monkeypatch, flag):
    """huggingface_hub would retry a stalled metadata request 6 times with a 60 s timeout; ours fail at the first."""
    monkeypatch.setattr(hub, "STALL_TIMEOUT_S", 1.0)
    url, message, elapsed = load_failure(local_hub, "stalls", flag)
    assert message.startswith(f"{flag} org/model: could not load ") and f"from {url}" in message and "\n" not in message, message
    assert "ReadTimeout" in message and elapsed < 10, (message, elapsed)


@pytest.mark.timeout(120)
def test_train_py_with_a_silent_hub_endpoint_exits_2_in_seconds(tmp_path):
    """The audit's case: HF_ENDPOINT accepts connections and never answers; `train.py --vae ema` took 398 s."""
    with endpoint("silent") as url:
        env = dict(os.environ, HF_ENDPOINT=url, HF_HOME=str(tmp_path / "hf"), NO_PROXY="127.0.0.1", no_proxy="127.0.0.1", PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
        env.pop("HF_HUB_OFFLINE", None)
        env.pop("HF_HUB_CACHE", None)
        flags = ["--model", "DiT-S/2", "--vae", "ema", "--image_size", "16", "--dataset", "shapes", "--num_classes", "8", "--batch_size", "4",
                 "--max_steps", "1", "--depth", "2", "--hidden_size", "32", "--num_heads", "2", "--device", "cpu", "--outputs", str(tmp_path / "out")]
        start = time.time()
        done = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *flags], capture_output=True, text=True, cwd=ROOT, env=env, timeout=100)
        elapsed = time.time() - start
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1, done.stderr[-2000:]
    assert err[0] == (f"error: --vae ema (stabilityai/sd-vae-ft-ema): not in the local cache and the hub ({url}) cannot be reached "
                      "(no answer within 3 s); pass a local folder holding an AutoencoderKL"), err[0]
    assert elapsed < 30, elapsed


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["silent", "stalls"])
def test_official_checkpoint_from_a_silent_or_stalling_server_fails_in_seconds(monkeypatch, tmp_path, kind):
    """The probe's HEAD first; once it passes, torch.hub's download runs under socket timeouts (it sets none)."""
    from opendit.checkpoint import weights

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setattr(hub, "STALL_TIMEOUT_S", 1.0)
    with endpoint(kind) as url:
        monkeypatch.setattr(weights, "OFFICIAL_DIT_URL", url + "/org/{}")
        start = time.time()
        with pytest.raises(CheckpointError) as info:
            _download_official("DiT-XL-2-256x256.pt")
        elapsed = time.time() - start
    expected = f"{url.split('/')[2]} cannot be reached (no answer within 3 s); pass" if kind == "silent" else "the download failed ("
    assert str(info.value).startswith(f"--ckpt DiT-XL-2-256x256.pt: not a local file and {expected}"), str(info.value)
    assert elapsed < 6 and (kind == "silent" or os.listdir(tmp_path / "pretrained_models") == [])  # no partial file left


def test_bounded_downloads_leave_xet_out(monkeypatch):
    """hf_xet transfers through its own client, which the stall bound cannot reach: bounded downloads use plain HTTP."""
    from huggingface_hub import constants, set_client_factory
    from huggingface_hub.utils._runtime import is_xet_available
    from huggingface_hub.utils._http import default_client_factory

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    try:
        hub.bound_hub_requests()
        assert not is_xet_available()
    finally:
        set_client_factory(default_client_factory)
