"""Tunnel names, the hosts and paths that carry them, and the URLs handed out."""

from __future__ import annotations

import fnmatch
import ipaddress
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


def claim_refused(name: str, user: str, patterns: list[str], namespace: str | None) -> str | None:
    """Why ``user`` may not claim the free ``name`` its token's ``patterns`` allow; None if
    it may. ``namespace`` is the user whose own name ``name`` is or falls under
    (``NAME-...``), the longest such (``Store.namespace_of``).

    A name in another user's namespace is theirs: ``alice-*`` does not let alice take
    ``alice-ci`` (or ``alice-ci-prod``) from a user named ``alice-ci``. Only a token that
    lists the name itself, no wildcard, may (the admin meant it)."""
    if namespace is not None and namespace != user and name not in patterns:
        return f"name {name!r} belongs to another user"
    return None


def too_many_names(user: str, most: int) -> str:
    """Why ``user`` may claim no more names (``--max-names-per-user``: ``most``)."""
    return f"{user!r} holds {most} names already, the most a user may (an admin releases them)"


def default_patterns(user: str) -> list[str]:
    """The names a token claims when ``token create`` got no ``--name``."""
    return [user, f"{user}-*"]


class BadHost(ValueError):
    """A Host (or authority) that is not ``host[:port]`` (RFC 9110 7.2, RFC 3986 3.2.2)."""


#: Longest host accepted, port excluded: a DNS name is at most 253 characters, and an
#: IPv6 literal with brackets at most 47; nothing longer can name this server.
MAX_HOST_LENGTH = 255

# One label of a reg-name: unreserved (minus "."), sub-delims and pct-encoded characters
# (RFC 3986 3.2.2). "." separates labels, so an empty label ("a..b", ".a") is refused.
_REG_LABEL = re.compile(r"(?:[a-z0-9\-_~!$&'()*+,;=]|%[0-9a-f]{2})+")
_PORT = re.compile(r"[0-9]{1,5}")


def normalize_host(host: str) -> str:
    """The one value used to route: ``host`` lower-cased, without port or trailing dot.

    ``host`` is a Host header's value (or a URL's authority): exactly ``host[:port]``
    where host is a reg-name of RFC 3986 characters in non-empty dot-separated labels,
    or a bracketed IPv6 literal, and port is decimal up to 65535. An empty value stays
    empty (HTTP/1.0 sends none). Anything else (``@``, ``/``, ``#``, ``?``, spaces,
    empty labels, non-ASCII, a bad port) raises ``BadHost``: it must never be routed.
    """
    host = host.strip(" \t")  # optional whitespace around a field value is not part of it
    if not host:
        return ""
    if not host.isascii():
        raise BadHost("the Host is not ASCII")
    host = host.lower()
    port = None
    if host.startswith("["):
        literal, bracket, rest = host.partition("]")
        if not bracket:
            raise BadHost("unclosed IPv6 literal in the Host")
        try:
            ipaddress.IPv6Address(literal[1:])
        except ValueError as exc:
            raise BadHost("invalid IPv6 literal in the Host") from exc
        name = literal + "]"
        if rest:
            if not rest.startswith(":"):
                raise BadHost("unexpected characters after the IPv6 literal")
            port = rest[1:]
    else:
        name, colon, port_text = host.partition(":")
        if colon:
            port = port_text
        if name.endswith("."):
            name = name[:-1]  # the root label: "alice.relay.test." is alice.relay.test
        if not name or not all(_REG_LABEL.fullmatch(label) for label in name.split(".")):
            raise BadHost("the Host is not a valid host name")
    if len(name) > MAX_HOST_LENGTH:
        raise BadHost(f"the Host is over {MAX_HOST_LENGTH} characters")
    if port is not None and not (_PORT.fullmatch(port) and int(port) <= 65535):
        raise BadHost("the Host's port is not a number from 0 to 65535")
    return name


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
        try:
            host = normalize_host(parts.netloc)
        except BadHost as bad_host:
            raise ConfigError(f"public URL {url!r} has an invalid host: {bad_host}") from bad_host
        return cls(parts.scheme, parts.netloc.lower(), host)

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
