"""The pieces behind operating a server (issue 9), one at a time: request ids, the
access log's path, the JSON log format, who counts as local, ``--metrics-listen``
parsing, the status tables, and /readyz when the store fails."""

from __future__ import annotations

import ipaddress
import json
import logging
import uuid
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from relay_server.access import MAX_LOGGED_PATH, loggable_path, new_uuid4, request_id
from relay_server.app import create_app
from relay_server.config import ServerConfig, parse_listen
from relay_server.connections import forwarded_client
from relay_server.errors import StoreError
from relay_server.logs import JsonFormatter
from relay_server.status import age, render
from relay_server.store import Store

PROXY = (ipaddress.ip_network("10.0.0.0/8"),)


@pytest.mark.parametrize(
    ("headers", "kept"),
    [
        ([(b"X-Request-Id", b"abc-123")], "abc-123"),
        ([(b"x-request-id", b"A.b_c~d:e+f/g=h")], "A.b_c~d:e+f/g=h"),
        ([(b"X-Request-Id", b"x" * 128)], "x" * 128),
    ],
)
def test_a_sane_client_request_id_is_kept(headers: list[tuple[bytes, bytes]], kept: str) -> None:
    assert request_id(headers) == kept


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [(b"X-Request-Id", b"")],
        [(b"X-Request-Id", b"x" * 129)],
        [(b"X-Request-Id", b"two words")],
        [(b"X-Request-Id", b"caf\xe9")],
        [(b"X-Request-Id", b'a"b')],
        [(b"X-Request-Id", b"a"), (b"X-Request-Id", b"b")],
    ],
)
def test_any_other_gets_a_new_uuid(headers: list[tuple[bytes, bytes]]) -> None:
    made = request_id(headers)
    assert str(uuid.UUID(made)) == made


def test_new_request_ids_are_random_version_4_uuids() -> None:
    made = {new_uuid4() for _ in range(2000)}
    assert len(made) == 2000
    parsed = [uuid.UUID(m) for m in made]
    assert all(str(u) == m for u, m in zip(parsed, made, strict=True))
    assert {u.version for u in parsed} == {4} and {u.variant for u in parsed} == {uuid.RFC_4122}
    # Every random bit varies: no bit outside the version and variant is stuck.
    varying = 0
    for u in parsed:
        varying |= u.int ^ parsed[0].int
    assert bin(varying).count("1") == 122


def test_the_logged_path_has_no_query_and_only_printable_ascii() -> None:
    assert loggable_path("/hook?token=secret") == "/hook"
    assert loggable_path("/caf\udce9 x\x7f") == "/caf\\udce9\\x20x\\x7f"
    long = loggable_path("/" + "a" * 1000)
    assert long.endswith("...") and len(long) == MAX_LOGGED_PATH + 3


def test_json_lines_carry_the_fields_at_the_top_level() -> None:
    record = logging.LogRecord("relay.access", logging.INFO, __file__, 1, "k=v %s", ("x",), None)
    record.fields = {"status": 200, "tunnel": "alice"}
    record.summary = "GET / 200"
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "GET / 200"
    assert (line["status"], line["tunnel"], line["level"], line["logger"]) == (
        200,
        "alice",
        "info",
        "relay.access",
    )
    assert line["time"].endswith("Z")
    plain = logging.LogRecord("relay.server", logging.WARNING, __file__, 1, "a %s", ("b",), None)
    assert json.loads(JsonFormatter().format(plain))["message"] == "a b"


@pytest.mark.parametrize(
    ("peer", "chain", "client"),
    [
        ("203.0.113.1", [b"198.51.100.1"], "203.0.113.1"),  # not a proxy: its header is nobody's word
        ("10.0.0.1", [], "10.0.0.1"),  # the proxy itself
        ("10.0.0.1", [b"198.51.100.1"], "198.51.100.1"),
        ("10.0.0.1", [b"6.6.6.6, 198.51.100.1, 10.0.0.2"], "198.51.100.1"),  # the rightmost stranger
        ("10.0.0.1", [b"6.6.6.6", b"198.51.100.1"], "198.51.100.1"),  # two headers, in order
        ("10.0.0.1", [b"garbage, 198.51.100.1"], "198.51.100.1"),
        ("10.0.0.1", [b"198.51.100.1, garbage"], "10.0.0.1"),  # unparsable: stop at the proxy
    ],
)
def test_the_forwarded_client(peer: str, chain: list[bytes], client: str) -> None:
    assert forwarded_client(PROXY, peer, chain) == client


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("127.0.0.1:9100", ("127.0.0.1", 9100)), ("[::1]:9100", ("::1", 9100)), ("0.0.0.0:0", ("0.0.0.0", 0))],
)
def test_metrics_listen_addresses(text: str, parsed: tuple[str, int]) -> None:
    assert parse_listen(text) == parsed


@pytest.mark.parametrize("text", ["9100", ":9100", "host:", "host:port", "host:70000", "[::1]"])
def test_bad_metrics_listen_addresses(text: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_listen(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (59.9, "59s"), (61, "1m01s"), (7260, "2h01m"), (90000, "1d01h"), (-5, "0s")],
)
def test_ages(seconds: float, text: str) -> None:
    assert age(seconds) == text


def test_the_status_tables() -> None:
    doc = {
        "now": 1000.0,
        "draining": True,
        "agents": [
            {"user": "alice", "names": ["alice", "alice-x"], "label": "", "remote": "::1", "since": 880.0}
        ],
        "tunnels": [
            {"name": "alice", "owner": "alice", "agents": 1, "waiting": 0, "oldest_waiting_at": None},
            {"name": "bob", "owner": "bob", "agents": 0, "waiting": 3, "oldest_waiting_at": 400.0},
        ],
    }
    lines = render(doc).splitlines()
    assert lines[0] == "agents connected: 1  (draining)"
    assert lines[2].split() == ["alice", "alice,alice-x", "-", "::1", "2m00s", "ago"]
    assert lines[3] == "tunnels: 2"
    assert lines[5].split() == ["alice", "alice", "1", "0", "-"]
    assert lines[6].split() == ["bob", "bob", "0", "3", "10m00s", "ago"]


async def test_readyz_is_503_when_the_store_cannot_be_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(ServerConfig(data_dir=tmp_path, public_url="http://relay.test"))
    async with TestClient(TestServer(app)) as client:
        async with client.get("/readyz", headers={"Host": "relay.test"}) as resp:
            assert (resp.status, await resp.text()) == (200, "ready\n")

        def broken(self: Store) -> None:
            raise StoreError("the store cannot be written: disk I/O error")

        monkeypatch.setattr(Store, "check_writable", broken)
        async with client.get("/readyz", headers={"Host": "relay.test"}) as resp:
            assert resp.status == 503
            assert resp.headers["X-Relay-Error"] == "not-ready"
            assert "disk I/O error" in await resp.text()
        async with client.get("/healthz", headers={"Host": "relay.test"}) as resp:
            assert resp.status == 200  # alive all the same


def test_check_writable_raises_on_a_closed_store(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.check_writable()
    store.close()
    with pytest.raises(StoreError, match="cannot be written"):
        store.check_writable()


@pytest.mark.parametrize("per_tunnel", [False, True])
def test_request_figures_are_exposed_as_prometheus_counts_them(per_tunnel: bool) -> None:
    # The request metrics are plain numbers turned into families at scrape time: what a
    # scraper parses must be what prometheus_client's own Counter and Histogram gave.
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from relay_server.metrics import DURATION_BUCKETS, Metrics

    class NoSessions:
        def sessions(self) -> list[object]:
            return []

    metrics = Metrics(registry=NoSessions(), store=None, per_tunnel=per_tunnel)  # type: ignore[arg-type]
    observed = [  # route, status, error, tunnel, seconds, read, sent
        ("tunnel", 200, "", "alice", 0.005, 10, 1),  # on a bound: counted in that bucket ("le")
        ("tunnel", 200, "", "alice", 0.0051, 20, 2),
        ("tunnel", 502, "local-unreachable", "bob", 1000.0, 30, 3),  # over every bound
        ("server", 404, "not-found", None, 0.2, 0, 5),
        ("tunnel", 499, "", None, 0.0, 0, 0),  # a tunnel request whose owner was never known
    ]
    for route, status, error, tunnel, seconds, read, sent in observed:
        metrics.observe_request(
            route=route, status=status, error=error, tunnel=tunnel, seconds=seconds, read=read, sent=sent
        )
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
        for s in family.samples
    }

    Key = tuple[str, tuple[tuple[str, str], ...]]

    def key(name: str, *labels: tuple[str, str], tunnel: str | None = None) -> Key:
        if per_tunnel and tunnel is not None:
            labels += (("tunnel", tunnel),)
        return name, tuple(sorted(labels))

    ok = (("error", ""), ("route", "tunnel"), ("status_class", "2xx"))
    if per_tunnel:
        assert samples[key("relay_requests_total", *ok, tunnel="alice")] == 2
        assert samples[key("relay_request_duration_seconds_count", tunnel="alice")] == 2
        assert samples[key("relay_request_duration_seconds_bucket", ("le", "0.005"), tunnel="alice")] == 1
        assert samples[key("relay_request_duration_seconds_bucket", ("le", "+Inf"), tunnel="bob")] == 1
        assert samples[key("relay_request_duration_seconds_bucket", ("le", "300.0"), tunnel="bob")] == 0
        assert samples[key("relay_request_body_bytes_total", tunnel="alice")] == 30
        assert samples[key("relay_response_body_bytes_total", tunnel="")] == 0
    else:
        assert samples[key("relay_requests_total", *ok)] == 2
        bucket = "relay_request_duration_seconds_bucket"
        buckets = [samples[key(bucket, ("le", str(b)))] for b in DURATION_BUCKETS]
        # 0.0 and 0.005 in the first; 1000 s over every bound
        assert buckets[0] == 2 and buckets == sorted(buckets) and buckets[-1] == 3
        assert samples[key("relay_request_duration_seconds_bucket", ("le", "+Inf"))] == 4
        assert samples[key("relay_request_duration_seconds_count")] == 4
        assert samples[key("relay_request_duration_seconds_sum")] == pytest.approx(1000.0101)
        assert samples[key("relay_request_body_bytes_total")] == 60
        assert samples[key("relay_response_body_bytes_total")] == 6
    errors = (("error", "local-unreachable"), ("route", "tunnel"), ("status_class", "5xx"))
    assert samples[key("relay_requests_total", *errors, tunnel="bob")] == 1
    not_found = (("error", "not-found"), ("route", "server"), ("status_class", "4xx"))
    assert samples[key("relay_requests_total", *not_found, tunnel="")] == 1
