"""The local target: parse ``--forward``, build the URL of each forwarded request, and
name the TLS server (``tls_name``)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from .errors import AgentConfigError, InvalidTarget


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


#: A host name as ``--forward`` takes it: RFC 3986 reg-name characters, no percent
#: escapes (IPv6 literals come in brackets and are checked by ``ipaddress``).
_HOST_NAME = re.compile(r"^[A-Za-z0-9._~-]+\Z")
_USAGE = "use PORT, HOST:PORT or http(s)://HOST[:PORT]"
PORT_RANGE = "the port must be a number from 1 to 65535"


def parse_target(text: str) -> Target:
    """``8080``, ``localhost:8080``, ``[::1]:8080`` or ``http(s)://host[:port]``.

    Raises ``InvalidTarget`` (its message names ``--forward``) for anything else:
    no host, an empty or out-of-range port, another scheme, a path, query or fragment.
    """
    given = text
    text = text.strip()
    if text.isascii() and text.isdigit():
        text = f"localhost:{text}"
    if "://" not in text:
        text = "http://" + text

    def refuse(why: str) -> InvalidTarget:
        return InvalidTarget(given, why)

    try:
        parts = urlsplit(text)
    except ValueError as exc:
        raise refuse(f"{exc}; {_USAGE}") from exc
    try:
        port = url_port(parts)
    except ValueError as exc:
        raise refuse(str(exc)) from exc
    if parts.scheme not in ("http", "https"):
        raise refuse(f"the scheme must be http or https; {_USAGE}")
    if not parts.hostname:
        raise refuse(f"no host; {_USAGE}")
    if "@" in parts.netloc:
        raise refuse("credentials in the URL are not supported")
    if parts.path.strip("/") or parts.query or parts.fragment or text.endswith(("?", "#")):
        raise refuse("a path, query or fragment is not supported")
    if parts.netloc.endswith(":"):
        raise refuse(f"the port is empty; {_USAGE}")
    host = parts.hostname
    if parts.netloc.startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise refuse(f"{host!r} is not an IPv6 address") from exc
    elif not _HOST_NAME.match(host):
        raise refuse(f"{host!r} is not a host name; {_USAGE}")
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    return Target(parts.scheme, host, port)


def url_port(parts: SplitResult) -> int | None:
    """The port of a split URL, None when it names none. Raises ``ValueError`` saying
    ``PORT_RANGE`` for one that is not a number from 1 to 65535 (urllib's own words
    differ by case: "out of range 0-65535", "could not be cast to integer")."""
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError(PORT_RANGE)
    return port


#: A DNS label as a TLS server name takes it (RFC 1035 2.3.4, RFC 6066 3: no IP address).
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)\Z")
#: Longest DNS name (RFC 1035 2.3.4).
MAX_DNS_NAME = 253


def tls_name(host: str) -> str | None:
    """The TLS server name for a ``host[:port]`` (a Host header's value): the host name
    without port or final dot, None for an IP address (never sent as SNI). Raises
    ``ValueError`` naming the value if the host is not a DNS name."""
    host = host.strip()
    if host.startswith("["):
        return None  # an IPv6 literal
    name, colon, port = host.rpartition(":")
    if not colon or not port.isdigit():
        name = host
    name = name.rstrip(".")
    try:
        ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        return None
    if not name or len(name) > MAX_DNS_NAME or not all(_DNS_LABEL.match(label) for label in name.split(".")):
        raise ValueError(f"{host[:64]!r} is not a host name a certificate can be for")
    return name
