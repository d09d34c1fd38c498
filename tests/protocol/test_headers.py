"""Hop-by-hop headers never cross the relay; everything else does, in order."""

from __future__ import annotations

import pytest

from relay_protocol.headers import strip_hop_by_hop, transfer_coding_problem, without


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
