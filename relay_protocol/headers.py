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

    On every request and answer, both sides. What each name means is looked up, not
    worked out: the verdicts on names seen before are kept (``_Verdicts``), so a head
    without Connection (as a request's mostly is) costs a dict lookup a header; with
    one, the names it lists are dropped too, in a second pass (docs/performance.md)."""
    verdicts = _verdicts(drop, drop_prefixes)
    kept = []
    listed: set[bytes] | None = None
    for header in headers:
        verdict = verdicts.of(header[0])
        if verdict is _KEEP:
            kept.append(header)
        elif verdict is _CONNECTION:
            tokens = {token.strip().lower() for token in header[1].split(b",")}
            listed = tokens if listed is None else listed | tokens
    if listed and (listed := listed - _NOT_LISTED):  # names beyond the usual keep-alive
        return tuple([header for header in kept if header[0].lower() not in listed])
    return tuple(kept)


#: What a Connection header lists that need not be looked for among the kept: the
#: names dropped anyway, and ``END_TO_END``.
_NOT_LISTED = HOP_BY_HOP | END_TO_END
#: A name's verdict: kept, dropped, or the Connection header (dropped, and what it lists).
_KEEP, _DROP, _CONNECTION = "keep", "drop", "connection"
#: Names longer than this are judged each time, never kept: a verdict costs what its name
#: holds, and names come from anyone who sends a request.
_VERDICT_NAME_MAX = 64
#: Verdicts kept for each ``(drop, prefixes)``: the names real clients and apps send are a
#: few dozen. The table is shared by every tenant (names are kept as sent, any case), so
#: one that fills it (inventing names, or a name's case variants) only empties it: the
#: names in use are learnt again, and no one's answer ever depends on it, only its speed.
_VERDICTS_KEPT = 2048


class _Verdicts:
    """What each header name means to ``strip_hop_by_hop`` for one ``(named, prefixes)``:
    the names as sent (any case) mapped to ``_KEEP``, ``_DROP`` or ``_CONNECTION``."""

    def __init__(self, named: frozenset[bytes], prefixes: tuple[bytes, ...]) -> None:
        self.named = named
        self.prefixes = prefixes
        self.known: dict[bytes, str] = {}

    def of(self, name: bytes) -> str:
        verdict = self.known.get(name)
        if verdict is None:
            lowered = name.lower()
            if lowered == b"connection":
                verdict = _CONNECTION
            elif lowered in self.named or lowered.startswith(self.prefixes):
                verdict = _DROP
            else:
                verdict = _KEEP
            if len(name) <= _VERDICT_NAME_MAX:
                if len(self.known) >= _VERDICTS_KEPT:
                    self.known.clear()  # a sender that filled it does not keep it full
                self.known[name] = verdict
        return verdict


#: The verdicts for each ``(drop, drop_prefixes)`` the callers pass (a few constants).
_VERDICT_TABLES: dict[tuple[Collection[bytes], tuple[bytes, ...]], _Verdicts] = {}
#: Distinct ``(drop, drop_prefixes)`` kept: the callers pass constants, so a few; a bound
#: all the same, should one ever build them per call.
_TABLES_KEPT = 64


def _verdicts(drop: Collection[bytes], drop_prefixes: tuple[bytes, ...]) -> _Verdicts:
    """The kept verdicts for ``strip_hop_by_hop``'s ``drop`` and ``drop_prefixes``; a new
    table, not kept, for an unhashable ``drop`` (a list, a set) or past ``_TABLES_KEPT``."""
    key = (drop, drop_prefixes)
    try:
        table = _VERDICT_TABLES.get(key)
    except TypeError:  # unhashable: judged afresh each time
        return _Verdicts(HOP_BY_HOP.union(drop), (b"proxy-", *drop_prefixes))
    if table is None:
        table = _Verdicts(HOP_BY_HOP.union(drop), (b"proxy-", *drop_prefixes))
        if len(_VERDICT_TABLES) < _TABLES_KEPT:
            _VERDICT_TABLES[key] = table
    return table


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
