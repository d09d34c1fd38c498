"""Header rules shared by server and agent: which headers never cross a hop."""

from __future__ import annotations

from collections.abc import Collection

from .heads import Headers

#: Hop-by-hop headers (RFC 9110 7.6.1): they describe one connection, so a
#: proxy removes them, plus any header the Connection header names.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)


#: Fields a Connection header cannot make hop-by-hop: the request's Host (RFC 9112 3.2:
#: every HTTP/1.1 request carries one; the relay routed on it). A client listing it in
#: Connection would otherwise reach the app without one (a review found that with
#: ``--host-header preserve``).
END_TO_END = frozenset({b"host"})


def strip_hop_by_hop(
    headers: Headers, *, drop: Collection[bytes] = (), drop_prefixes: tuple[bytes, ...] = ()
) -> Headers:
    """Drop hop-by-hop headers and those listed in Connection (but ``END_TO_END``), and
    those whose lower-cased name is in ``drop`` or starts with one of ``drop_prefixes``
    (in the same pass); keep order and repeats."""
    listed = {
        token.strip().lower()
        for name, value in headers
        if name.lower() == b"connection"
        for token in value.split(b",")
    }
    named = HOP_BY_HOP.union(listed - END_TO_END, drop)
    prefixes = (b"proxy-", *drop_prefixes)
    return tuple(
        (name, value)
        for name, value in headers
        if (lowered := name.lower()) not in named and not lowered.startswith(prefixes)
    )


def without(headers: Headers, *names: bytes) -> Headers:
    """Drop every header whose lower-cased name is in ``names``."""
    return tuple((n, v) for n, v in headers if n.lower() not in names)


#: Headers of one WebSocket handshake hop: each side of the relay runs its own
#: handshake (key, accept, version, compression), so these never cross it.
WEBSOCKET_HANDSHAKE = (
    b"sec-websocket-key",
    b"sec-websocket-accept",
    b"sec-websocket-version",
    b"sec-websocket-extensions",
)


def is_websocket_upgrade(method: str, headers: Headers) -> bool:
    """True for a WebSocket opening handshake (GET with ``Upgrade: websocket``)."""
    return method == "GET" and any(
        name.lower() == b"upgrade" and value.strip().lower() == b"websocket" for name, value in headers
    )


def unsupported_transfer_coding(headers: Headers) -> bytes | None:
    """The first transfer coding in ``headers``' Transfer-Encoding fields other than
    ``chunked`` (lower case), or None. The relay re-frames every body it carries, so it
    removes Transfer-Encoding (a hop-by-hop field) and undoes ``chunked``; any other coding
    (``gzip``, ``deflate``, ``compress``, an extension) would reach the other side still
    applied to the bytes but no longer named. RFC 9112 6.1: a server that does not
    understand a request's transfer coding answers 501; an answer with one is a 502."""
    for name, value in headers:
        if name.lower() == b"transfer-encoding":
            for coding in value.split(b","):
                if (coding := coding.strip().lower()) != b"chunked":
                    return coding or b'""'
    return None


def header_value(headers: Headers, name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower case), or None."""
    return next((v for n, v in headers if n.lower() == name), None)
