"""Tunnel settings: defaults, validation of changes, the JSON form stored on the server."""

from __future__ import annotations

import json
from typing import Any

import pytest

from relay_server.errors import ConfigError
from relay_server.settings import (
    ANY_AGENT,
    MAX_CONCURRENCY_LIMIT,
    MAX_DESTINATIONS,
    TunnelSettings,
    check_destination,
)
from relay_server.ssrf import is_public


def test_defaults() -> None:
    settings = TunnelSettings()
    assert settings.mode == "queue"
    assert settings.retry_on == (429, 502, 503, 504)
    assert settings.max_concurrency is None  # "auto": the relay adapts it (concurrency.py)
    assert settings.to_json()["max_concurrency"] == "auto"
    assert settings.destinations == ("agent:*",) == (ANY_AGENT,)
    assert settings.fan_out is False


def test_updated_applies_only_the_given_fields() -> None:
    base = TunnelSettings()
    changed = base.updated({"mode": "live", "max_concurrency": 3})
    assert changed == TunnelSettings(mode="live", max_concurrency=3)
    assert changed.retry_on == base.retry_on
    assert changed.destinations == base.destinations
    assert base.mode == "queue"  # the original is untouched (frozen)
    assert base.updated({}) == base


def test_max_concurrency_is_auto_or_a_number_and_stored_as_given() -> None:
    fixed = TunnelSettings().updated({"max_concurrency": 8})
    assert fixed.max_concurrency == 8
    assert TunnelSettings.from_json(fixed.to_json()) == fixed  # a stored 8 stays a fixed 8
    auto = fixed.updated({"max_concurrency": "auto"})
    assert auto.max_concurrency is None and auto == TunnelSettings()
    assert TunnelSettings.from_json(auto.to_json()) == auto
    assert TunnelSettings.from_json({"mode": "live"}).max_concurrency is None  # not stored: auto


def test_retry_on_is_sorted_and_deduplicated() -> None:
    assert TunnelSettings().updated({"retry_on": [503, 500, 503, 429]}).retry_on == (429, 500, 503)
    assert TunnelSettings().updated({"retry_on": []}).retry_on == ()


def test_destinations_keep_their_order_without_duplicates() -> None:
    settings = TunnelSettings().updated(
        {"destinations": ["agent:laptop", "https://hooks.example.com/in", "agent:laptop", "agent:ci"]}
    )
    assert settings.destinations == ("agent:laptop", "https://hooks.example.com/in", "agent:ci")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"colour": "blue"}, "unknown setting 'colour'"),
        ({"mode": "fast"}, "mode must be one of queue, live"),
        ({"mode": None}, "mode must be one of"),
        ({"mode": "QUEUE"}, "mode must be one of"),
        ({"retry_on": [99]}, "retry_on must be a list of HTTP statuses"),
        ({"retry_on": [600]}, "retry_on must be a list of HTTP statuses"),
        ({"retry_on": ["503"]}, "retry_on must be a list of HTTP statuses"),
        ({"retry_on": [503.0]}, "retry_on must be a list of HTTP statuses"),
        ({"retry_on": 503}, "retry_on must be a list of HTTP statuses"),
        ({"retry_on": "503"}, "retry_on must be a list of HTTP statuses"),
        ({"max_concurrency": 0}, f'max_concurrency must be "auto" or between 1 and {MAX_CONCURRENCY_LIMIT}'),
        ({"max_concurrency": -1}, "max_concurrency must be"),
        ({"max_concurrency": MAX_CONCURRENCY_LIMIT + 1}, "max_concurrency must be"),
        ({"max_concurrency": "8"}, "max_concurrency must be"),
        ({"max_concurrency": 8.0}, "max_concurrency must be"),
        ({"max_concurrency": "Auto"}, "max_concurrency must be"),
        ({"max_concurrency": None}, "max_concurrency must be"),
        ({"max_concurrency": True}, "max_concurrency must be"),
        ({"destinations": []}, f"destinations must be a list of 1 to {MAX_DESTINATIONS} entries"),
        ({"destinations": "agent:*"}, "destinations must be a list"),
        (
            {"destinations": [f"agent:a{i}" for i in range(MAX_DESTINATIONS + 1)]},
            "destinations must be a list of 1 to 16 entries",
        ),
        ({"destinations": ["agent:my laptop"]}, "invalid agent label 'my laptop'"),
        ({"destinations": ["agent:"]}, "invalid agent label ''"),
        ({"destinations": ["agent:a/b"]}, "invalid agent label 'a/b'"),
        ({"destinations": ["agent:" + "x" * 65]}, "invalid agent label"),
        ({"destinations": [5]}, "a destination must be a string"),
        ({"destinations": ["hooks.example.com/in"]}, "must be agent:LABEL or an http(s) URL without"),
        ({"destinations": ["ftp://hooks.example.com/in"]}, "must be agent:LABEL or an http(s) URL"),
        ({"destinations": ["https://hooks.example.com/in?key=1"]}, "without user, query, fragment"),
        ({"destinations": ["https:///in"]}, "must be agent:LABEL or an http(s) URL"),
        ({"destinations": ["https://user@hooks.example.com/in"]}, "must be agent:LABEL or an http(s) URL"),
        # Found by a review: the event's path went into the fragment, never sent.
        ({"destinations": ["http://8.8.8.8:80#@127.0.0.1:35082"]}, "without user, query, fragment"),
        ({"destinations": ["https://hooks.example.com/in#x"]}, "without user, query, fragment"),
        ({"destinations": ["https://hooks.example.com/in?"]}, "without user, query, fragment"),
        ({"destinations": ["https://hooks.example.com/a\r\nb"]}, "control character"),
        ({"destinations": ["https://hooks.example.com/a\tb"]}, "control character"),
        ({"destinations": ["https://hooks.example.com/a b"]}, "control character"),
    ],
)
def test_invalid_changes_name_the_bad_field(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        TunnelSettings().updated(changes)
    assert message in str(caught.value)


@pytest.mark.parametrize("concurrency", [1, 8, MAX_CONCURRENCY_LIMIT])
def test_max_concurrency_bounds_are_inclusive(concurrency: int) -> None:
    assert TunnelSettings().updated({"max_concurrency": concurrency}).max_concurrency == concurrency


def test_sixteen_destinations_are_allowed() -> None:
    destinations = [f"agent:a{i}" for i in range(MAX_DESTINATIONS)]
    assert MAX_DESTINATIONS == 16
    assert TunnelSettings().updated({"destinations": destinations}).destinations == tuple(destinations)


@pytest.mark.parametrize(
    "destination",
    [
        "agent:*",
        "agent:laptop",
        "agent:ci-runner_2.eu",
        "agent:" + "x" * 64,
        "http://hooks.example.com",
        "https://hooks.example.com:8443/in/path",
        "http://127.0.0.1:9000/hook",  # syntax only: loopback is refused by the API, not here
    ],
)
def test_valid_destinations(destination: str) -> None:
    check_destination(destination)
    assert TunnelSettings().updated({"destinations": [destination]}).destinations == (destination,)


@pytest.mark.parametrize("changes", [{"max_concurrency": True}, {"retry_on": [True]}])
def test_json_true_is_not_a_number(changes: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        TunnelSettings().updated(changes)


def test_a_failed_update_changes_nothing() -> None:
    base = TunnelSettings(mode="live")
    with pytest.raises(ConfigError):
        base.updated({"mode": "queue", "max_concurrency": 0})
    assert base.mode == "live"


# -- JSON -------------------------------------------------------------------------------


def test_to_json_is_plain_json() -> None:
    settings = TunnelSettings(
        mode="live",
        retry_on=(500, 503),
        max_concurrency=4,
        destinations=("agent:laptop", "https://hooks.example.com/in"),
    )
    data = settings.to_json()
    assert data == {
        "mode": "live",
        "retry_on": [500, 503],
        "max_concurrency": 4,
        "destinations": ["agent:laptop", "https://hooks.example.com/in"],
    }
    assert json.loads(json.dumps(data)) == data


@pytest.mark.parametrize(
    "settings",
    [
        TunnelSettings(),
        TunnelSettings(mode="live"),
        TunnelSettings(retry_on=(), max_concurrency=256),
        TunnelSettings(destinations=("agent:a", "agent:b", "http://example.com/x")),
    ],
)
def test_json_round_trip(settings: TunnelSettings) -> None:
    stored = json.dumps(settings.to_json(), sort_keys=True)  # what the store keeps
    assert TunnelSettings.from_json(json.loads(stored)) == settings


def test_from_json_of_nothing_is_the_defaults() -> None:
    assert TunnelSettings.from_json(None) == TunnelSettings()
    assert TunnelSettings.from_json({}) == TunnelSettings()
    assert TunnelSettings.from_json({"mode": "live"}) == TunnelSettings(mode="live")


def test_from_json_validates() -> None:
    with pytest.raises(ConfigError, match="mode"):
        TunnelSettings.from_json({"mode": "sometimes"})


# -- fan-out ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("destinations", "fan_out"),
    [
        (["agent:*"], False),
        (["agent:laptop"], True),
        (["https://hooks.example.com/in"], True),
        (["agent:*", "agent:laptop"], True),
        (["agent:*", "agent:*"], False),  # duplicates collapse to the plain tunnel
    ],
)
def test_fan_out(destinations: list[str], fan_out: bool) -> None:
    assert TunnelSettings().updated({"destinations": destinations}).fan_out is fan_out


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2001:4860:4860::8888", True),
        ("127.0.0.1", False),
        ("::ffff:127.0.0.1", False),
        # IPv6 addresses carrying a private IPv4 one: found by a review, past the check.
        ("64:ff9b::7f00:1", False),  # NAT64 (RFC 6052)
        ("64:ff9b:1::a00:1", False),  # local-use NAT64 (RFC 8215), 10.0.0.1
        ("2002:7f00:1::", False),  # 6to4 of 127.0.0.1
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", False),  # Teredo: client 127.0.0.1
        ("::ffff:0:7f00:1", False),  # IPv4-translated (SIIT), from a second review
        ("::127.0.0.1", False),  # IPv4-compatible
        ("64:ff9b::808:808", True),  # NAT64 of 8.8.8.8
        ("2002:808:808::", True),  # 6to4 of 8.8.8.8
    ],
)
def test_an_ipv6_address_is_public_only_if_the_ipv4_one_it_carries_is(address: str, public: bool) -> None:
    assert is_public(address) is public
