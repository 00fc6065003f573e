"""Loading a model by local folder or hub id: a local folder directly; a hub id from the local cache first, then
from the hub only when a 3-second probe reaches it (with short HTTP timeouts), so no network fails in seconds."""
import os
import re
import socket
from typing import Callable
from urllib.parse import urlparse

HUB_ID = re.compile(r"^[\w-][\w.-]*/[\w-][\w.-]*$")  # "org/name"
LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError, TypeError)
PROBE_TIMEOUT_S = 3.0
for _name, _seconds in (("HF_HUB_ETAG_TIMEOUT", "10"), ("HF_HUB_DOWNLOAD_TIMEOUT", "20")):  # read when huggingface_hub is imported
    os.environ.setdefault(_name, _seconds)


def reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to url's host opens within `timeout` seconds (False under HF_HUB_OFFLINE=1)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout):
            return True
    except Exception:  # no route, no DNS, refused, or a sandbox that forbids sockets
        return False


def hub_url() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def one_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def load_local_or_hub(load: Callable[[bool], object], path: str, label: str, what: str):
    """load(local_files_only) for a folder or hub id `path`; every failure is a one-line ValueError naming `label`."""
    if not os.path.isdir(path):
        try:  # a cached hub download: no network needed
            return load(True)
        except LOAD_ERRORS:
            pass
        if not reachable(hub_url()):
            raise ValueError(f"{label}: not in the local cache and the hub ({hub_url()}) cannot be reached; pass a local folder holding {what}")
    try:
        return load(False)
    except LOAD_ERRORS as e:
        hint = "" if os.path.isdir(path) else "no network? pass a local path; "
        raise ValueError(f"{label}: could not load {what} ({hint}{one_line(e)})") from None
