"""``GET /_relay/status``: what ``relay-server status`` shows about a running server.

Connected agents (user, names, label, remote address, since) and tunnels (owner,
agents, events waiting, the oldest one's arrival). Answered to this host and trusted
proxies themselves, or to ``Authorization: Bearer <--admin-token>`` from anywhere.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from aiohttp import web

from relay_protocol import RelayError

from .config import Network
from .connections import is_local
from .public_errors import relay_error
from .registry import InFlight, Registry
from .store import Store

STATUS_PATH = "/_relay/status"
#: Seconds ``relay-server status`` waits for the running server.
STATUS_TIMEOUT = 10.0


class StatusUnavailable(RelayError):
    """``fetch`` got no status document; the message says why."""


class Status:
    def __init__(
        self,
        *,
        registry: Registry,
        store: Store,
        inflight: InFlight,
        trusted_proxies: tuple[Network, ...],
        admin_token: str | None,
    ) -> None:
        self.registry = registry
        self.store = store
        self.inflight = inflight
        self.trusted_proxies = trusted_proxies
        self.admin_token = admin_token

    def _allowed(self, request: web.Request) -> bool:
        if is_local(request, self.trusted_proxies):
            return True
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        return (
            self.admin_token is not None
            and scheme.lower() == "bearer"
            and hmac.compare_digest(token.strip().encode(), self.admin_token.encode())
        )

    async def handle(self, request: web.Request) -> web.Response:
        """The status document (JSON), or 401 ``unauthorized`` off the box without the admin token.

        Shape: ``{"now", "draining", "agents": [{"id", "user", "names", "label", "remote",
        "since", "streams"}], "tunnels": [{"name", "owner", "agents", "waiting",
        "waiting_bytes", "oldest_waiting_at"}]}``; times in seconds since the epoch.
        """
        if not self._allowed(request):
            return relay_error(
                "unauthorized", "the status is for this host, or for the admin token (--admin-token)"
            )
        sessions = self.registry.sessions()
        names, waiting = await asyncio.gather(
            asyncio.to_thread(self.store.list_names), asyncio.to_thread(self.store.waiting_summary)
        )
        agents: dict[str, int] = {}
        for session in sessions:
            for name in session.names:
                agents[name] = agents.get(name, 0) + 1
        tunnels: list[dict[str, Any]] = []
        for record in names:
            count, size, oldest = waiting.get(record.name, (0, 0, None))
            tunnels.append(
                {
                    "name": record.name,
                    "owner": record.user,
                    "agents": agents.get(record.name, 0),
                    "waiting": count,
                    "waiting_bytes": size,
                    "oldest_waiting_at": oldest,
                }
            )
        return web.json_response(
            {
                "now": time.time(),
                "draining": self.inflight.draining,
                "agents": [
                    {
                        "id": s.id,
                        "user": s.user,
                        "names": s.names,
                        "label": s.label,
                        "remote": s.remote,
                        "since": s.since,
                        "streams": s.open_streams,
                    }
                    for s in sessions
                    if s.user  # authenticated, past the handshake
                ],
                "tunnels": tunnels,
            }
        )


def age(seconds: float) -> str:
    """A duration as people read it: ``42s``, ``3m10s``, ``2h05m``, ``3d04h``."""
    whole = max(0, int(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def render(doc: dict[str, Any]) -> str:
    """The status document as the two tables ``relay-server status`` prints."""
    now = doc["now"]
    lines = [f"agents connected: {len(doc['agents'])}{'  (draining)' if doc['draining'] else ''}"]
    if doc["agents"]:
        lines.append(f"  {'USER':16}  {'NAMES':32}  {'LABEL':12}  {'REMOTE':39}  CONNECTED")
        for a in doc["agents"]:
            lines.append(
                f"  {a['user']:16}  {','.join(a['names']):32}  {a['label'] or '-':12}  {a['remote']:39}"
                f"  {age(now - a['since'])} ago"
            )
    lines.append(f"tunnels: {len(doc['tunnels'])}")
    if doc["tunnels"]:
        lines.append(f"  {'NAME':32}  {'OWNER':16}  {'AGENTS':6}  {'WAITING':>7}  OLDEST WAITING")
        for t in doc["tunnels"]:
            oldest = "-" if t["oldest_waiting_at"] is None else f"{age(now - t['oldest_waiting_at'])} ago"
            lines.append(f"  {t['name']:32}  {t['owner']:16}  {t['agents']:6}  {t['waiting']:7}  {oldest}")
    return "\n".join(lines)


def fetch(server: str, admin_token: str | None, ca_file: Path | None) -> dict[str, Any]:
    """The status document of the server at ``server`` (``http(s)://host:port``), asked
    with ``admin_token`` if given, verifying HTTPS against ``ca_file`` or the system's CAs.
    Raises ``StatusUnavailable`` naming the cause. Proxy settings in the environment are
    ignored: the server is usually on this host."""
    if not server.startswith(("http://", "https://")):
        raise StatusUnavailable(f"server URL {server!r} must start with http:// or https://")
    url = server.rstrip("/") + STATUS_PATH
    headers = {"Authorization": f"Bearer {admin_token}"} if admin_token else {}
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise StatusUnavailable(f"--ca-file {ca_file}: {getattr(exc, 'strerror', None) or exc}") from exc
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )
    try:
        with opener.open(urllib.request.Request(url, headers=headers), timeout=STATUS_TIMEOUT) as response:
            doc = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        why = exc.read(512).decode("utf-8", "replace").strip()
        raise StatusUnavailable(f"{url}: {exc.code} {why}") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise StatusUnavailable(f"cannot reach {url}: {getattr(exc, 'reason', exc)}") from exc
    if not isinstance(doc, dict) or "agents" not in doc:
        raise StatusUnavailable(f"{url} did not answer with a relay status")
    return doc
