"""Tunnel names, the hosts and paths that carry them, and the URLs handed out."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from .errors import ConfigError

# A DNS label (RFC 1123), lower case: the name must work as a subdomain.
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
# A name pattern in a token: a label where '*' may stand for any run of label characters.
_PATTERN = re.compile(r"[a-z0-9*]([a-z0-9*-]{0,61}[a-z0-9*])?")


def is_valid_name(name: str) -> bool:
    return bool(_LABEL.fullmatch(name))


def is_valid_pattern(pattern: str) -> bool:
    return bool(_PATTERN.fullmatch(pattern))


def name_allowed(name: str, patterns: list[str]) -> bool:
    """True if ``name`` matches one of a token's name patterns (``alice``, ``alice-*``)."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def default_patterns(user: str) -> list[str]:
    """The names a token claims when ``token create`` got no ``--name``."""
    return [user, f"{user}-*"]


def normalize_host(host: str) -> str:
    """Lower-case ``host``, drop its port and trailing dot: the one value used to route."""
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8000
        return host.split("]", 1)[0] + "]"
    host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return host.rstrip(".")


@dataclass(frozen=True)
class PublicOrigin:
    """Scheme and authority the server hands out URLs under (``--public-url``)."""

    scheme: str
    authority: str  # host[:port], as written in the public URL
    host: str  # normalised host: what Host headers are compared with

    @classmethod
    def parse(cls, url: str) -> PublicOrigin:
        parts = urlsplit(url)
        try:
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError as exc:
            raise ConfigError(f"public URL {url!r} has an invalid port") from exc
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"public URL {url!r} must look like https://relay.example.com")
        if parts.username is not None or parts.password is not None:
            raise ConfigError(f"public URL {url!r} must not carry a user name or password")
        if parts.path.strip("/") or parts.query or parts.fragment:
            raise ConfigError(f"public URL {url!r} must have no path, query or fragment")
        return cls(parts.scheme, parts.netloc.lower(), normalize_host(parts.netloc))

    def subdomain_url(self, name: str) -> str:
        return f"{self.scheme}://{name}.{self.authority}"

    def path_url(self, name: str) -> str:
        return f"{self.scheme}://{self.authority}/t/{name}"

    def urls(self, name: str) -> list[str]:
        return [self.subdomain_url(name), self.path_url(name)]

    def subdomain_of(self, host: str) -> str | None:
        """The tunnel name if ``host`` (normalised) is ``NAME.<public host>``, else None."""
        suffix = "." + self.host
        if host.endswith(suffix):
            label = host[: -len(suffix)]
            if label and "." not in label:
                return label
        return None
