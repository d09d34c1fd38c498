"""The ingress's pure checks (issue 8, §1, §2, §4): response framing, the size of the
head it would send, connection caps, and the accept() log limiter."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from click.testing import CliRunner

from relay_protocol import RequestHead, ResponseHead
from relay_protocol.heads import encode_request_head
from relay_protocol.limits import MAX_HEAD_SIZE
from relay_server.cli import main
from relay_server.connections import ACCEPT_LOG_INTERVAL, BUSY_RESPONSE, AcceptErrorLog, trusts
from relay_server.ingress import (
    BadResponse,
    Refused,
    check_head_fits,
    encoded_head_size,
    response_framing,
)
from relay_web.guard import FD_RESERVE, ConnectionGuard, effective_max_connections

# -- response framing ----------------------------------------------------------


def head(status: int, *headers: tuple[bytes, bytes]) -> ResponseHead:
    return ResponseHead(status, tuple(headers))


@pytest.mark.parametrize(
    ("method", "response", "framing"),
    [
        ("GET", head(200, (b"Content-Length", b"5")), (True, 5)),
        ("GET", head(200), (True, None)),
        ("GET", head(200, (b"content-length", b"5"), (b"Content-Length", b"5")), (True, 5)),
        ("GET", head(200, (b"Content-Length", b"5, 5")), (True, 5)),
        ("HEAD", head(200, (b"Content-Length", b"5")), (False, 5)),
        ("GET", head(204), (False, None)),
        ("GET", head(304, (b"Content-Length", b"5")), (False, 5)),
        ("POST", head(404, (b"Content-Length", b"0")), (True, 0)),
    ],
)
def test_framing_of_good_responses(
    method: str, response: ResponseHead, framing: tuple[bool, int | None]
) -> None:
    assert response_framing(method, response) == framing


@pytest.mark.parametrize(
    "response",
    [
        head(100),
        head(101, (b"Upgrade", b"websocket")),
        head(103),
        head(200, (b"Content-Length", b"2"), (b"Content-Length", b"3")),
        head(200, (b"Content-Length", b"2, 3")),
        head(200, (b"Content-Length", b"2"), (b"Transfer-Encoding", b"chunked")),
        head(200, (b"Content-Length", b"-1")),
        head(200, (b"Content-Length", b"+1")),
        head(200, (b"Content-Length", b"0x10")),
        head(200, (b"Content-Length", b"")),
        head(200, (b"Content-Length", b"9" * 40)),
    ],
)
def test_unframeable_responses_are_refused(response: ResponseHead) -> None:
    with pytest.raises(BadResponse):
        response_framing("GET", response)


# -- the head the relay would send ------------------------------------------------


@pytest.mark.parametrize(
    "request_head",
    [
        RequestHead("GET", b"/", ()),
        RequestHead("POST", b"/x?y=1", ((b"A", b"b"), (b"X-Long", b"v" * 1000)), "127.0.0.1", "evt_1"),
    ],
)
def test_encoded_head_size_is_the_encoders(request_head: RequestHead) -> None:
    assert encoded_head_size(request_head) == len(encode_request_head(request_head))


def test_a_head_that_fits_passes_and_one_that_does_not_is_431_or_414() -> None:
    check_head_fits(RequestHead("GET", b"/" + b"a" * 8000, ((b"X", b"v" * 50_000),)))
    with pytest.raises(Refused) as too_large:
        check_head_fits(RequestHead("GET", b"/", ((b"X", b"v" * 60_000), (b"Y", b"v" * 6_000))))
    assert too_large.value.code == "headers-too-large"
    with pytest.raises(Refused) as too_long:
        check_head_fits(RequestHead("GET", b"/" + b"a" * 9000, ()))
    assert too_long.value.code == "uri-too-long"
    with pytest.raises(Refused) as too_many:
        check_head_fits(RequestHead("GET", b"/", tuple((b"X", b"1") for _ in range(255))))
    assert too_many.value.code == "headers-too-large"


def test_what_fits_leaves_room_for_a_queued_deliverys_headers() -> None:
    # Just under the relay's limit: adding the three X-Relay-* headers still encodes.
    big = RequestHead("POST", b"/", ((b"X", b"v" * (MAX_HEAD_SIZE - 600)),), "127.0.0.1")
    check_head_fits(big)
    delivered = RequestHead(
        big.method,
        big.target,
        (
            *big.headers,
            (b"X-Relay-Event-Id", b"evt_" + b"0" * 26),
            (b"X-Relay-Attempt", b"1000"),
            (b"X-Relay-Received-At", b"2026-01-01T00:00:00.000000Z"),
        ),
        big.client,
        "evt_" + "0" * 26,
    )
    assert len(encode_request_head(delivered)) <= MAX_HEAD_SIZE


# -- connection caps ---------------------------------------------------------------


def test_the_guard_caps_total_and_per_client_connections() -> None:
    guard = ConnectionGuard(max_connections=5, max_per_client=2, head_timeout=1, busy_response=BUSY_RESPONSE)
    assert guard.admit("10.0.0.1") and guard.admit("10.0.0.1")
    assert not guard.admit("10.0.0.1")
    assert guard.admit("10.0.0.2") and guard.admit("10.0.0.3") and guard.admit("10.0.0.3")
    assert not guard.admit("10.0.0.4")  # 5 in all
    guard.release("10.0.0.1")
    assert guard.admit("10.0.0.1")
    assert guard.refused == 2


def test_a_trusted_proxy_is_not_capped_per_client() -> None:
    proxies = [ipaddress.ip_network("127.0.0.0/8")]
    guard = ConnectionGuard(
        max_connections=100,
        max_per_client=1,
        head_timeout=1,
        busy_response=BUSY_RESPONSE,
        exempt=lambda client: trusts(proxies, client),
    )
    assert all(guard.admit("127.0.0.1") for _ in range(10))
    assert guard.admit("10.0.0.1") and not guard.admit("10.0.0.1")


def test_the_total_stays_below_the_descriptor_limit() -> None:
    assert effective_max_connections(10_000, limit=1024) == 1024 - FD_RESERVE
    assert effective_max_connections(100, limit=1024) == 100


@pytest.mark.parametrize(
    ("address", "trusted"),
    [("127.0.0.1", True), ("::ffff:127.0.0.1", True), ("10.0.0.1", False), ("nonsense", False), ("", False)],
)
def test_trusts(address: str, trusted: bool) -> None:
    assert trusts([ipaddress.ip_network("127.0.0.0/8")], address) is trusted


# -- the accept() log flood ---------------------------------------------------------


class FakeLoop:
    def __init__(self) -> None:
        self.passed: list[dict[str, Any]] = []

    def default_exception_handler(self, context: dict[str, Any]) -> None:
        self.passed.append(context)


def test_accept_failures_are_logged_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    handler = AcceptErrorLog(clock=lambda: now[0])
    loop = FakeLoop()
    context = {
        "message": "socket.accept() out of system resource",
        "exception": OSError(24, "Too many open files"),
    }
    for _ in range(10_000):
        handler(loop, context)  # type: ignore[arg-type]
    now[0] += ACCEPT_LOG_INTERVAL
    handler(loop, context)  # type: ignore[arg-type]
    lines = [r for r in caplog.records if "accept() failed" in r.getMessage()]
    assert len(lines) == 2
    assert "9999 more" in lines[1].getMessage()
    assert all(r.exc_info is None for r in lines)
    handler(loop, {"message": "something else"})  # type: ignore[arg-type]
    assert loop.passed == [{"message": "something else"}]


# -- options -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["--trusted-proxy", "not-a-cidr"],
        ["--max-connections", "0"],
        ["--max-connections-per-client", "0"],
        ["--head-timeout", "0"],
    ],
)
def test_bad_serve_options_are_usage_errors(args: list[str]) -> None:
    result = CliRunner().invoke(main, ["serve", *args])
    assert result.exit_code == 2, result.output
