"""The Hugging Face hub, asked once: without a network, hub ids fail in seconds, not after retries.

huggingface_hub retries an unreachable host for about a minute before transformers reports it.
Before anything loads a hub id, ftcore checks once that the hub answers; when it does not, it turns
on ``HF_HUB_OFFLINE`` for this process and says so, so that a model or dataset in the local cache
still loads and one that is not fails at once with the libraries' own "not in the cache" error.
That check is ftcore's only outbound call, and only for configs that name a hub id: the libraries'
usage calls (telemetry, download counts) are turned off for every ftcore process.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from urllib.parse import urlparse

DEFAULT_ENDPOINT = "https://huggingface.co"
TRUE = {"1", "on", "yes", "true"}


def hub_is_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is on for this process."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in TRUE


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub endpoint (``HF_ENDPOINT``) opens within ``timeout`` s."""
    url = urlparse(os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT)
    address = (url.hostname or "", url.port or (443 if url.scheme == "https" else 80))
    answered: list[bool] = []

    def connect() -> None:  # name lookup has no timeout of its own: the thread bounds it
        try:
            socket.create_connection(address, timeout=timeout).close()
            answered.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered)


NO_USAGE_CALLS = {"HF_HUB_DISABLE_TELEMETRY": "1", "HF_UPDATE_DOWNLOAD_COUNTS": "false"}
"""huggingface_hub's telemetry (also used by transformers) and datasets' download counts."""


def no_usage_calls() -> None:
    """Turn off the hub libraries' usage calls for this process (and its children), also in hub
    libraries already imported. No ftcore process reports anything anywhere."""
    os.environ.update(NO_USAGE_CALLS)
    for module, name, value in (
        ("huggingface_hub.constants", "HF_HUB_DISABLE_TELEMETRY", True),
        ("datasets.config", "HF_UPDATE_DOWNLOAD_COUNTS", False),
    ):
        if module in sys.modules:
            setattr(sys.modules[module], name, value)


def go_offline() -> None:
    """Turn on offline mode for this process, also in hub libraries already imported."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    for module, name in (
        ("huggingface_hub.constants", "HF_HUB_OFFLINE"),
        ("datasets.config", "HF_HUB_OFFLINE"),
    ):
        if module in sys.modules:
            setattr(sys.modules[module], name, True)


def offline_unless_reachable(hub_ids: list[str], log=print) -> None:
    """If ``hub_ids`` is non-empty and the hub does not answer, go offline and say so (once)."""
    if not hub_ids or hub_is_offline():
        return
    if not hub_reachable():
        go_offline()
        log(
            f"ftcore: the Hugging Face hub does not answer; {', '.join(hub_ids)} must come from the local "
            "cache (HF_HUB_OFFLINE=1 set for this run)"
        )
