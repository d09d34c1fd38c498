"""``normalize_host``: the one parser of Host headers (issue 8, §3).

A Host is exactly ``host[:port]`` (RFC 9110 7.2, RFC 3986 3.2.2): a reg-name of
unreserved, sub-delims and pct-encoded characters in non-empty labels, or a bracketed
IPv6 literal, and an optional decimal port. Anything else would let a crafted Host
reach one tunnel while looking like another (``bob.relay.test:80@alice.relay.test``).
"""

from __future__ import annotations

import pytest

from relay_server.ingress import ApexRoute, TunnelRoute, route
from relay_server.names import BadHost, PublicOrigin, normalize_host

ORIGIN = PublicOrigin.parse("http://relay.test:8000")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("alice.relay.test", "alice.relay.test"),
        ("alice.relay.test:8000", "alice.relay.test"),
        ("alice.relay.test:0", "alice.relay.test"),
        ("alice.relay.test:65535", "alice.relay.test"),
        ("ALICE.relay.test.", "alice.relay.test"),
        ("127.0.0.1", "127.0.0.1"),
        ("[::1]:8000", "[::1]"),
        ("[2001:db8::1]", "[2001:db8::1]"),
        ("a-b_c~d.relay.test", "a-b_c~d.relay.test"),  # unreserved
        ("x%41y.relay.test", "x%41y.relay.test"),  # pct-encoded is kept, never decoded
        ("a!$&'()*+,;=b.test", "a!$&'()*+,;=b.test"),  # sub-delims
        ("", ""),  # no Host (HTTP/1.0): the apex
    ],
)
def test_hosts_per_rfc_3986_are_accepted(raw: str, expected: str) -> None:
    assert normalize_host(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "bob.relay.test:8000@alice.relay.test",  # the reported one
        "alice.relay.test:8000@bob.relay.test",  # its mirror
        "bob.relay.test@alice.relay.test",
        "user:pass@alice.relay.test",
        "alice.relay.test/x",
        "alice.relay.test#bob",
        "alice.relay.test?bob",
        "alice.relay.test\\bob",
        "alice..relay.test",
        ".alice.relay.test",
        "alice.relay.test..",
        "..",
        ".",
        "alice relay.test",
        "alice.relay.test :80",
        "al\tice.relay.test",
        "alicé.relay.test",
        "alice.relay.test:",
        "alice.relay.test:80:80",
        "alice.relay.test:http",
        "alice.relay.test:65536",
        "alice.relay.test:-1",
        "alice.relay.test:+80",
        "alice.relay.test:123456",
        "x%4.relay.test",
        "x%zz.relay.test",
        "[::1",
        "[::1]x",
        "[::1]:",
        "[::1]:99999",
        "[not-ipv6]",
        "::1",  # an IPv6 address must be bracketed
        "a\x00b",
        "a" * 256,
        '"alice.relay.test"',
        "<alice.relay.test>",
    ],
)
def test_anything_else_is_refused(raw: str) -> None:
    with pytest.raises(BadHost):
        normalize_host(raw)


def test_a_refused_host_is_never_routed_to_a_tunnel() -> None:
    # What the old parser made of the reported Host: bob's tunnel.
    with pytest.raises(BadHost):
        route(normalize_host("bob.relay.test:8000@alice.relay.test"), "/x", ORIGIN)


def test_a_good_host_routes_as_before() -> None:
    assert route(normalize_host("Alice.Relay.Test:8000"), "/x", ORIGIN) == TunnelRoute("alice", "/x", "")
    assert route(normalize_host("relay.test:8000"), "/healthz", ORIGIN) == ApexRoute("/healthz")


def test_a_public_url_with_a_bad_host_is_a_config_error() -> None:
    from relay_server.errors import ConfigError

    with pytest.raises(ConfigError):
        PublicOrigin.parse("http://relay..test")
