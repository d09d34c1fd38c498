"""Hop-by-hop headers never cross the relay; everything else does, in order."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay_protocol import headers as header_rules
from relay_protocol.headers import END_TO_END, HOP_BY_HOP, strip_hop_by_hop, transfer_coding_problem, without


@pytest.mark.parametrize(
    "name",
    [
        b"Connection",
        b"Keep-Alive",
        b"TE",
        b"Trailer",
        b"Transfer-Encoding",
        b"Upgrade",
        b"Proxy-Connection",
        b"Proxy-Authenticate",
        b"Proxy-Authorization",
        b"Proxy-Anything-Else",
        b"transfer-encoding",
        b"KEEP-ALIVE",
        b"proxy-authorization",
    ],
)
def test_drops_hop_by_hop(name: bytes) -> None:
    headers = ((b"Host", b"a.example"), (name, b"x"), (b"Accept", b"*/*"))
    assert strip_hop_by_hop(headers) == ((b"Host", b"a.example"), (b"Accept", b"*/*"))


def test_drops_headers_named_in_connection() -> None:
    headers = (
        (b"Connection", b"keep-alive, X-Hop ,x-other"),
        (b"X-Hop", b"1"),
        (b"X-End", b"2"),
        (b"X-OTHER", b"3"),
        (b"connection", b"X-Third"),
        (b"x-third", b"4"),
    )
    assert strip_hop_by_hop(headers) == ((b"X-End", b"2"),)


def test_connection_cannot_make_host_hop_by_hop() -> None:
    headers = ((b"Host", b"a.example"), (b"Connection", b"Host, X-Hop"), (b"X-Hop", b"1"))
    assert strip_hop_by_hop(headers) == ((b"Host", b"a.example"),)


def test_keeps_order_and_repeats() -> None:
    headers = (
        (b"Set-Cookie", b"a=1; Path=/"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Content-Type", b"text/html"),
        (b"Set-Cookie", b"b=2"),
        (b"Keep-Alive", b"timeout=5"),
        (b"set-cookie", b"c=3"),
        (b"X-Custom", b""),
    )
    assert strip_hop_by_hop(headers) == (
        (b"Set-Cookie", b"a=1; Path=/"),
        (b"Content-Type", b"text/html"),
        (b"Set-Cookie", b"b=2"),
        (b"set-cookie", b"c=3"),
        (b"X-Custom", b""),
    )


def test_names_and_values_are_kept_byte_for_byte() -> None:
    headers = ((b"X-MiXeD", b" spaced \xff value "),)
    assert strip_hop_by_hop(headers) == headers


def test_end_to_end_headers_that_look_similar_are_kept() -> None:
    headers = (
        (b"Content-Encoding", b"gzip"),
        (b"Trailers", b"x"),
        (b"X-Upgrade", b"y"),
        (b"Connection-Id", b"z"),
        (b"Proxy", b"p"),  # no dash: not a Proxy-* header
    )
    assert strip_hop_by_hop(headers) == headers


def test_empty() -> None:
    assert strip_hop_by_hop(()) == ()


def test_a_header_named_close_goes_with_connection_close() -> None:
    """RFC 9110 7.6.1: every field named by a connection option goes, ``close`` too."""
    headers = ((b"Connection", b"close"), (b"Close", b"1"), (b"X-End", b"2"))
    assert strip_hop_by_hop(headers) == ((b"X-End", b"2"),)


def _stripped_by_hand(
    headers: tuple[tuple[bytes, bytes], ...], drop: frozenset[bytes], prefixes: tuple[bytes, ...]
) -> tuple[tuple[bytes, bytes], ...]:
    """RFC 9110 7.6.1 read plainly, each name lowered and judged every time: what the
    kept verdicts of ``strip_hop_by_hop`` must always agree with."""
    listed = {
        token.strip().lower()
        for name, value in headers
        if name.lower() == b"connection"
        for token in value.split(b",")
    }
    named = HOP_BY_HOP | (listed - END_TO_END) | drop
    return tuple(
        (name, value)
        for name, value in headers
        if name.lower() not in named and not name.lower().startswith((b"proxy-", *prefixes))
    )


_NAMES = st.sampled_from(
    [b"Host", b"host", b"HOST", b"Connection", b"connection", b"Keep-Alive", b"X-A", b"x-a",
     b"X-B", b"Close", b"Proxy-Thing", b"X-Forwarded-For", b"x-forwarded-host", b"TE", b"Accept"]
)  # fmt: skip
_VALUES = st.sampled_from([b"", b"x", b"close", b"keep-alive", b"X-A", b"x-a, X-B", b"host", b" te , ,x-b"])


@given(
    headers=st.lists(st.tuples(_NAMES, _VALUES), max_size=12).map(tuple),
    drop=st.sampled_from([frozenset(), frozenset({b"x-b"}), frozenset({b"accept", b"x-a"})]),
    prefixes=st.sampled_from([(), (b"x-forwarded-",)]),
)
def test_kept_verdicts_always_agree_with_judging_every_name(
    headers: tuple[tuple[bytes, bytes], ...], drop: frozenset[bytes], prefixes: tuple[bytes, ...]
) -> None:
    expected = _stripped_by_hand(headers, drop, prefixes)
    for _ in range(2):  # judged, then looked up
        assert strip_hop_by_hop(headers, drop=drop, drop_prefixes=prefixes) == expected


def test_verdicts_kept_are_bounded_and_names_past_the_bound_still_judged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Names come from anyone who sends a request: a sender inventing new ones (or long
    ones, or case variants) fills a bounded table, which then starts again, so names in
    use are learnt again; every name is judged right all the same."""
    monkeypatch.setattr(header_rules, "_VERDICT_TABLES", {})
    kept = header_rules._VERDICTS_KEPT
    for batch in range(3):
        invented = tuple((b"X-Invented-%d-%d" % (batch, i), b"1") for i in range(kept))
        assert strip_hop_by_hop((*invented, (b"kEEP-aLIVE", b"5"))) == invented
        (table,) = header_rules._VERDICT_TABLES.values()
        assert len(table.known) <= kept
    long_name = b"X-" + b"a" * header_rules._VERDICT_NAME_MAX
    assert strip_hop_by_hop(((long_name, b"1"), (b"Proxy-" + long_name, b"2"))) == ((long_name, b"1"),)
    assert long_name not in table.known
    assert strip_hop_by_hop(((b"Content-Type", b"text/plain"),)) == ((b"Content-Type", b"text/plain"),)
    assert table.known[b"Content-Type"] == "keep"  # learnt after the table was filled


def test_without() -> None:
    headers = ((b"Host", b"h"), (b"X-A", b"1"), (b"x-a", b"2"), (b"Accept", b"*/*"))
    assert without(headers, b"host", b"x-a") == ((b"Accept", b"*/*"),)


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ([(b"Transfer-Encoding", b"chunked")], None),
        ([(b"transfer-encoding", b" Chunked ")], None),
        ([(b"Transfer-Encoding", b"\tchunked")], None),
        ([(b"Transfer-Encoding", b", ,chunked")], None),  # empty elements: RFC 9110 5.6.1
        ([(b"Transfer-Encoding", b""), (b"Transfer-Encoding", b"chunked")], None),
        ([(b"Content-Length", b"5")], None),
        ([], None),
        ([(b"Transfer-Encoding", b"gzip, chunked")], "transfer coding 'gzip'"),
        (
            [(b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"deflate")],
            "transfer coding 'deflate'",
        ),
        ([(b"Transfer-Encoding", b"gzip"), (b"Transfer-Encoding", b"chunked")], "transfer coding 'gzip'"),
        ([(b"TRANSFER-ENCODING", b"X-Custom ,chunked")], "transfer coding 'x-custom'"),
        ([(b"Transfer-Encoding", b"identity, chunked")], "transfer coding 'identity'"),
        ([(b"Transfer-Encoding", b"chunked, chunked")], "chunked applied more than once"),
        (
            [(b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"chunked")],
            "chunked applied more than once",
        ),
        ([(b"Transfer-Encoding", b"chunked\t")], "transfer coding 'chunked\\t'"),  # llhttp: not chunked
        ([(b"Transfer-Encoding", b"chunked,")], "an empty element after chunked"),  # llhttp: not chunked
        ([(b"Transfer-Encoding", b" , ")], "an empty Transfer-Encoding"),
    ],
)
def test_transfer_coding_problem_names_what_cannot_cross(
    fields: list[tuple[bytes, bytes]], problem: str | None
) -> None:
    assert transfer_coding_problem(tuple(fields)) == problem
