"""Where the inspector listens (``--inspect``), and which Host headers are its own.

The default is ``127.0.0.1:4040``, the next free port up to ``4040 + DEFAULT_PORT_TRIES
- 1`` when it is taken (a second agent on the same machine); an address given with
``--inspect`` is bound exactly, or not at all.

DNS rebinding: a page on ``evil.example`` can make its name resolve to 127.0.0.1 and
then read anything on the inspector's port, with the browser's blessing, since for the
browser it is evil.example's own origin. Its requests carry ``Host: evil.example:4040``,
though. So the inspector answers only requests whose Host is one of its own: the
address it listens on, and, when that is a loopback address, ``localhost``,
``127.0.0.1`` and ``[::1]`` (names no DNS answer can change); on a wildcard address
(``0.0.0.0``, ``::``), any IP address (a literal address is not a name to rebind). An
``Origin``, when a browser sends one, must be ``http://`` and one of the same.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from relay_web.listen import authority

from ..errors import AgentConfigError
from ..target import url_port

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4040
#: Ports tried from 4040 when the default is taken: room for ten agents on one machine.
DEFAULT_PORT_TRIES = 10
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


@dataclass(frozen=True)
class InspectAddress:
    """A host (IPv6 without brackets) and port to listen on; ``exact`` when the user gave it."""

    host: str
    port: int
    exact: bool = True

    @property
    def authority(self) -> str:
        return authority(self.host, self.port)

    def candidates(self) -> list[InspectAddress]:
        """The addresses to try in order: this one, or for the default the next ports too."""
        if self.exact:
            return [self]
        return [InspectAddress(self.host, self.port + i, exact=False) for i in range(DEFAULT_PORT_TRIES)]

    @property
    def loopback(self) -> bool:
        """True if only this machine can reach it."""
        return _is_loopback(self.host)

    @property
    def url(self) -> str:
        """The URL to print: a wildcard address is reached through loopback, [::1] for
        "::" (its socket is IPv6 only, as the server's)."""
        if self.host == "0.0.0.0":
            return f"http://127.0.0.1:{self.port}"
        if self.host == "::":
            return f"http://[::1]:{self.port}"
        return f"http://{self.authority}"

    def allows_host(self, header: str) -> bool:
        """True if ``header`` (a Host header's value) names this inspector (see the module doc)."""
        parts = urlsplit("http://" + header.strip())
        try:
            port = parts.port or 80
        except ValueError:
            return False
        host = (parts.hostname or "").lower()
        if port != self.port or not host or parts.username is not None or parts.path:
            return False
        if host == self.host.lower():
            return True
        if self.host in ("0.0.0.0", "::"):
            return host == "localhost" or _is_ip(host)
        named = f"[{host}]" if ":" in host else host
        return self.loopback and named in _LOOPBACK_NAMES

    def allows_origin(self, origin: str) -> bool:
        """True if a browser's ``Origin`` header is this inspector's own page."""
        if not origin.lower().startswith("http://"):
            return False  # "null" (a sandboxed frame, a file), https://, anything else
        return self.allows_host(origin[len("http://") :])


def default_address() -> InspectAddress:
    return InspectAddress(DEFAULT_HOST, DEFAULT_PORT, exact=False)


def parse_address(text: str) -> InspectAddress:
    """``PORT`` (on 127.0.0.1), ``HOST:PORT`` or ``[IPv6]:PORT``; ``localhost`` is
    127.0.0.1. Raises ``AgentConfigError`` naming ``--inspect`` for anything else."""
    given = text
    text = text.strip()
    if text.isascii() and text.isdigit():
        text = f"{DEFAULT_HOST}:{text}"
    if text.count(":") > 1 and not text.startswith("["):  # ::1:4050 said "the port must be a number"
        raise AgentConfigError(
            f"invalid --inspect {given!r}: an IPv6 address goes in brackets, as [::1]:4050"
        )
    parts = urlsplit("http://" + text)
    try:
        port = url_port(parts)
    except ValueError as exc:
        raise AgentConfigError(f"invalid --inspect {given!r}: {exc}") from exc
    host = parts.hostname
    if (
        port is None
        or not host
        or parts.path
        or parts.query
        or parts.username is not None
        or text.endswith(":")
    ):
        raise AgentConfigError(f"invalid --inspect {given!r}: use PORT, HOST:PORT or [IPv6]:PORT")
    if host == "localhost":
        host = DEFAULT_HOST  # loopback whatever the resolver says, and one address to print
    return InspectAddress(host, port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
