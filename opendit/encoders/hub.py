"""Loading a model by local folder or hub id: a local folder directly; a hub id from the local cache first, then from
the hub only when a 3-second HTTP probe of the model's config.json gets an answer (HF_ENDPOINT and the proxy variables
honoured). The download's requests are then bounded: one that makes no progress for 20 s fails at once instead of
being retried, so an offline machine, a dead endpoint or one that never answers fails in seconds, in one line."""
import os
import re
import ssl
import threading
import urllib.error
import urllib.request
from typing import Callable, Optional

HUB_ID = re.compile(r"^[\w-][\w.-]*/[\w-][\w.-]*$")  # "org/name"
LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError, TypeError)
PROBE_TIMEOUT_S = 3.0  # the whole probe: DNS, connect, request, answer
STALL_TIMEOUT_S = 20.0  # a hub request (connect, each read or write) without progress for this long fails
for _name, _seconds in (("HF_HUB_ETAG_TIMEOUT", "10"), ("HF_HUB_DOWNLOAD_TIMEOUT", "20")):  # read when huggingface_hub is imported
    os.environ.setdefault(_name, _seconds)


def one_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer: the probe does not follow it (to a CDN, say)."""

    def redirect_request(self, *args, **kwargs):
        return None


def _head(url: str, timeout: float) -> Optional[str]:
    """None when url answers a HEAD request with anything but 404, else what went wrong."""
    opener = urllib.request.build_opener(_NoRedirect)  # with a ProxyHandler for HTTP(S)_PROXY / NO_PROXY
    try:
        opener.open(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
        return None
    except urllib.error.HTTPError as e:  # an answer: 401 (private or gated), 302, 5xx are the download's to judge
        e.close()
        return f"answered HTTP 404 for {url}" if e.code == 404 else None
    except Exception as e:  # no route, no DNS, refused, timeout, a sandbox that forbids sockets
        reason = getattr(e, "reason", e)
        if isinstance(reason, ssl.SSLError):  # it spoke TLS: the download's own certificates (certifi) may differ
            return None
        if isinstance(reason, TimeoutError):
            return f"cannot be reached (no answer within {timeout:g} s)"
        return f"cannot be reached ({type(reason).__name__}: {one_line(reason) if isinstance(reason, BaseException) else reason})"


def probe(url: str, timeout: float = PROBE_TIMEOUT_S) -> Optional[str]:
    """What keeps url from being used, as "cannot be reached (...)" or "answered HTTP 404 for ..."; None when it
    answers a HEAD request within `timeout` seconds in all (name lookup included). Never contacted under HF_HUB_OFFLINE=1."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return "cannot be reached (HF_HUB_OFFLINE is set)"
    answer = []
    thread = threading.Thread(target=lambda: answer.append(_head(url, timeout)), daemon=True)
    thread.start()
    thread.join(timeout)  # a hung name lookup ignores the socket timeout: the thread is left behind
    return answer[0] if answer else f"cannot be reached (no answer within {timeout:g} s)"


def hub_url() -> str:
    """The endpoint huggingface_hub downloads from (HF_ENDPOINT when set)."""
    from huggingface_hub import constants

    return constants.ENDPOINT


class HubStalled(OSError):
    """A hub request that made no progress in time or lost its connection; not retried."""


def bound_hub_requests() -> None:
    """From now on, each of huggingface_hub's requests waits at most STALL_TIMEOUT_S for progress, and a timeout or a
    network error ends the download at once: huggingface_hub retries those (up to 6 tries of 10-60 s), minutes in all.
    Files stored in Xet come over plain HTTP too: hf_xet's own client is outside this bound. A huggingface_hub without
    client factories (before its httpx2 client) keeps its own timeouts (HF_HUB_DOWNLOAD_TIMEOUT, set above)."""
    try:
        import httpx2
        from huggingface_hub import constants, set_client_factory
        from huggingface_hub.utils._http import default_client_factory
    except ImportError:
        return

    def bounded_client():
        client = default_client_factory()
        send = client.send

        def bounded_send(request, **kwargs):
            asked = request.extensions.get("timeout") or {}
            request.extensions["timeout"] = {k: min(asked.get(k) or STALL_TIMEOUT_S, STALL_TIMEOUT_S) for k in ("connect", "read", "write", "pool")}
            try:
                return send(request, **kwargs)
            except (httpx2.TimeoutException, httpx2.NetworkError, httpx2.RemoteProtocolError) as e:
                raise HubStalled(f"{request.method} {request.url}: {type(e).__name__} ({one_line(e)})") from None

        client.send = bounded_send
        return client

    set_client_factory(bounded_client)
    constants.HF_HUB_DISABLE_XET = True


def load_local_or_hub(load: Callable[[bool], object], path: str, label: str, what: str):
    """load(local_files_only) for a folder or hub id `path`; every failure is a one-line ValueError naming `label`."""
    if not os.path.isdir(path):
        try:  # a cached hub download: no network needed
            return load(True)
        except LOAD_ERRORS:
            pass
        endpoint = hub_url()
        problem = probe(f"{endpoint}/{path}/resolve/main/config.json")
        if problem:
            raise ValueError(f"{label}: not in the local cache and the hub ({endpoint}) {problem}; pass a local folder holding {what}")
        bound_hub_requests()
    try:
        return load(False)
    except LOAD_ERRORS as e:
        hint = "" if os.path.isdir(path) else f"from {hub_url()}; no network? pass a local path; "
        raise ValueError(f"{label}: could not load {what} ({hint}{one_line(e)})") from None
