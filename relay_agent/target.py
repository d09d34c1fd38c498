"""The local target: parse ``--forward`` and build the URL of each forwarded request."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from .errors import AgentConfigError


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str  # as written, without brackets for IPv6
    port: int

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.authority}"

    def url_for(self, target: bytes, websocket: bool = False) -> str:
        """The URL for a request target; only ever this host and port, whatever the target says."""
        if not target.startswith(b"/"):
            raise AgentConfigError("request target is not a path")
        base = self.base_url
        if websocket:
            base = ("wss" if self.scheme == "https" else "ws") + base[len(self.scheme) :]
        return base + target.decode("utf-8", "surrogateescape")


def parse_target(text: str) -> Target:
    """``8080``, ``localhost:8080``, ``[::1]:8080`` or ``http(s)://host[:port]``."""
    text = text.strip()
    if text.isdigit():
        text = f"localhost:{text}"
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise AgentConfigError(f"invalid --forward {text!r}: {exc}") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise AgentConfigError(f"invalid --forward {text!r}: use PORT, HOST:PORT or http://HOST:PORT")
    if parts.path.strip("/") or parts.query:
        raise AgentConfigError(f"invalid --forward {text!r}: a path prefix is not supported")
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    if not 0 < port < 65536:
        raise AgentConfigError(f"invalid port in --forward {text!r}")
    return Target(parts.scheme, parts.hostname, port)
