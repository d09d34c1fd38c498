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
    (in the same pass); keep order and repeats.

    On every request and answer, both sides: each name is lowered once, and the set of
    names dropped is built once per ``drop`` (a head without Connection, as most are,
    builds nothing): 3.2 -> 1.8 us for a webhook's head (docs/performance.md)."""
    lowered = [name.lower() for name, _ in headers]
    prefixes = (b"proxy-", *drop_prefixes) if drop_prefixes else _PROXY_PREFIX
    if b"connection" in lowered:
        listed = {
            token.strip().lower()
            for (_, value), name in zip(headers, lowered, strict=True)
            if name == b"connection"
            for token in value.split(b",")
        }
        named = HOP_BY_HOP.union(listed - END_TO_END, drop)
    else:
        named = _dropped(drop)
    return tuple(
        [
            header
            for header, name in zip(headers, lowered, strict=True)
            if name not in named and not name.startswith(prefixes)
        ]
    )


_PROXY_PREFIX = (b"proxy-",)
#: ``HOP_BY_HOP`` with each ``drop`` collection a caller passes (a few constants).
_DROPPED: dict[Collection[bytes], frozenset[bytes]] = {}


def _dropped(drop: Collection[bytes]) -> frozenset[bytes]:
    """``HOP_BY_HOP`` and ``drop``, made once per hashable ``drop``."""
    if not drop:
        return HOP_BY_HOP
    try:
        return _DROPPED[drop]
    except KeyError:
        named = HOP_BY_HOP.union(drop)
        if len(_DROPPED) < _DROPPED_KEPT:
            _DROPPED[drop] = named
        return named
    except TypeError:  # a list or a set: not kept
        return HOP_BY_HOP.union(drop)


#: Distinct ``drop`` collections kept: the callers pass constants, so a few; a bound all
#: the same, should one ever build them per call.
_DROPPED_KEPT = 64


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


def transfer_coding_problem(headers: Headers) -> str | None:
    """Why the body framed by ``headers``' Transfer-Encoding fields cannot cross the
    relay, or None (no such field, or exactly ``chunked``).

    The relay re-frames every body it carries: it removes Transfer-Encoding (a hop-by-hop
    field) and takes off one ``chunked``. Any other coding (``gzip``, ``deflate``, an
    extension), or ``chunked`` applied twice (RFC 9112 6.1 forbids it), would reach the
    other side still applied to the bytes but no longer named. RFC 9112 6.1: a server
    that does not understand a request's transfer coding answers 501.

    What is ``chunked`` is read as llhttp (aiohttp's parser and the agent's) reads it, so
    that this rule and the parser never disagree: spaces and tabs before a coding, spaces
    after it (with a tab after it, llhttp does not take it for chunked), and empty list
    elements ignored (RFC 9110 5.6.1) but after the last ``chunked``, where llhttp no
    longer takes the body for chunked."""
    codings: list[bytes] | None = None
    for name, value in headers:
        if name.lower() == b"transfer-encoding":
            codings = codings or []
            codings += [item.lstrip(b" \t").rstrip(b" ").lower() for item in value.split(b",")]
    if codings is None:
        return None
    named = [coding for coding in codings if coding.strip(b" \t")]
    if named == [b"chunked"] and codings[-1] == b"chunked":
        return None
    if not named:
        return "an empty Transfer-Encoding"
    other = next((coding for coding in named if coding != b"chunked"), None)
    if other is not None:
        return f"transfer coding {other[:32].decode('latin-1')!r}"
    if len(named) > 1:
        return "chunked applied more than once"
    return "an empty element after chunked"  # llhttp no longer reads the body as chunked


def header_value(headers: Headers, name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower case), or None."""
    return next((v for n, v in headers if n.lower() == name), None)
