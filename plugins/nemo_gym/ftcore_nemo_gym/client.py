"""HTTP to NeMo Gym (stdlib only): discovery from the head server, one cookie session per rollout.

Every request has a timeout. A request that gets no answer at all (refused, reset, timed out) is
retried ``retries`` times, 1 s apart and doubling; then it raises ``ServerDown``. An answer that is
not 200 or not JSON raises ``BadReply``. Both name the server and the URL.
"""

from __future__ import annotations

import http.client
import http.cookiejar
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

RESERVED_KEYS = {"head_server", "disallowed_ports", "port_range_low", "port_range_high", "python_version"}


class GymError(Exception):
    """A request to a Gym server failed."""


class ServerDown(GymError):
    """The server did not answer (after the retries)."""


class BadReply(GymError):
    """The server answered, but not with 200 and JSON."""


@dataclass
class Server:
    """One server of the deployment: instance name, kind (resources_servers, ...), URL, its config."""

    name: str
    kind: str
    url: str
    config: dict


class Session:
    """One rollout's cookie jar: ``/seed_session``, tool calls and ``/verify`` share its cookies."""

    def __init__(self, retries: int = 2):
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())
        )
        self.retries = retries

    def post(self, server: Server, path: str, body: dict, timeout: float):
        return self.request(server, path, body, timeout)

    def request(self, server: Server, path: str, body: dict | None, timeout: float):
        url = server.url + path
        data = None if body is None else json.dumps(body).encode()
        headers = {"content-type": "application/json"} if data is not None else {}
        delay = 1.0
        for attempt in range(self.retries + 1):
            try:
                with self.opener.open(urllib.request.Request(url, data, headers), timeout=timeout) as reply:
                    text = reply.read().decode("utf-8", "replace")
                break
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode("utf-8", "replace")[:300]
                raise BadReply(f"Gym server {server.name} ({url}) answered {exc.code}: {detail}") from None
            except (OSError, http.client.HTTPException) as exc:  # refused, reset, cut off, timed out
                if attempt == self.retries:
                    raise ServerDown(
                        f"Gym server {server.name} ({url}) does not answer: {getattr(exc, 'reason', exc)}"
                    ) from None
                time.sleep(delay)
                delay *= 2
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            raise BadReply(
                f"Gym server {server.name} ({url}) answered with no JSON: {text[:200]!r}"
            ) from None


def reachable(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "localhost", "", None) else host


def discover(head_url: str, timeout: float = 10.0) -> dict[str, Server]:
    """The deployment's servers by instance name, from the head server's global config."""
    import yaml

    head = Server("head", "head_server", head_url.rstrip("/"), {})
    text = Session(retries=0).request(head, "/global_config_dict_yaml", None, timeout)
    config = yaml.safe_load(text) if isinstance(text, str) else text
    if not isinstance(config, dict):
        raise BadReply(f"Gym head server ({head.url}/global_config_dict_yaml) sent no global config")
    servers = {}
    for name, entry in config.items():
        if name in RESERVED_KEYS or not isinstance(entry, dict) or len(entry) != 1:
            continue
        kind, implementations = next(iter(entry.items()))
        if not isinstance(implementations, dict) or len(implementations) != 1:
            continue
        settings = next(iter(implementations.values()))
        if not isinstance(settings, dict) or "port" not in settings:
            continue
        url = f"http://{reachable(settings.get('host'))}:{settings['port']}"
        servers[name] = Server(name, kind, url, settings)
    return servers


def wait_until_up(servers: dict[str, Server], deadline: float, alive=lambda: True) -> None:
    """Poll ``GET /`` of every server until it answers (any HTTP status counts) or ``deadline`` passes."""
    for server in servers.values():
        while True:
            try:
                urllib.request.urlopen(server.url + "/", timeout=5).close()
                break
            except urllib.error.HTTPError:
                break  # it answers: older Gym servers have no "/" route
            except OSError as exc:
                if not alive():
                    raise ServerDown(
                        f"Gym exited before server {server.name} ({server.url}) answered"
                    ) from None
                if time.time() > deadline:
                    raise ServerDown(
                        f"Gym server {server.name} ({server.url}) did not answer in time: {exc}"
                    ) from None
                time.sleep(1)
