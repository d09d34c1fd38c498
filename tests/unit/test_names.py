"""Tunnel names, hosts and the public origin: the values every route is decided on."""

from __future__ import annotations

import pytest

from relay_server.errors import ConfigError
from relay_server.names import (
    BadHost,
    PublicOrigin,
    default_patterns,
    is_valid_name,
    is_valid_pattern,
    name_allowed,
    normalize_host,
)

# -- normalize_host ------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("alice.relay.test", "alice.relay.test"),
        ("Alice.Relay.TEST", "alice.relay.test"),
        ("alice.relay.test.", "alice.relay.test"),
        ("alice.relay.test:8000", "alice.relay.test"),
        ("ALICE.relay.test.:8000", "alice.relay.test"),
        ("  alice.relay.test  ", "alice.relay.test"),
        ("[::1]:8000", "[::1]"),
        ("[::1]", "[::1]"),
        ("[2001:DB8::1]:443", "[2001:db8::1]"),
        ("127.0.0.1:8000", "127.0.0.1"),
        ("", ""),
    ],
)
def test_normalize_host(raw: str, expected: str) -> None:
    assert normalize_host(raw) == expected


def test_normalize_host_refuses_a_bare_ipv6_address() -> None:
    # RFC 3986: an IPv6 address in an authority is bracketed; "::1" is no host[:port].
    with pytest.raises(BadHost):
        normalize_host("::1")


# -- PublicOrigin.parse --------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "scheme", "authority", "host"),
    [
        ("http://relay.test", "http", "relay.test", "relay.test"),
        ("https://relay.example.com", "https", "relay.example.com", "relay.example.com"),
        ("https://relay.example.com/", "https", "relay.example.com", "relay.example.com"),
        ("http://Relay.Test:8000", "http", "relay.test:8000", "relay.test"),
        ("http://localhost:8000", "http", "localhost:8000", "localhost"),
        ("http://[::1]:8000", "http", "[::1]:8000", "[::1]"),
    ],
)
def test_public_origin_parses_good_urls(url: str, scheme: str, authority: str, host: str) -> None:
    assert PublicOrigin.parse(url) == PublicOrigin(scheme, authority, host)


@pytest.mark.parametrize(
    "url",
    [
        "",
        "relay.test",  # no scheme
        "ftp://relay.test",
        "ws://relay.test",
        "http://",
        "http:///path",
        "http://relay.test/relay",
        "http://relay.test/?x=1",
        "http://relay.test/#top",
    ],
)
def test_public_origin_refuses_bad_urls(url: str) -> None:
    with pytest.raises(ConfigError, match="public URL"):
        PublicOrigin.parse(url)


@pytest.mark.parametrize("url", ["http://relay.test:99999", "http://relay.test:abc"])
def test_public_origin_refuses_an_invalid_port(url: str) -> None:
    with pytest.raises(ConfigError):
        PublicOrigin.parse(url)


def test_public_origin_refuses_userinfo() -> None:
    with pytest.raises(ConfigError):
        PublicOrigin.parse("http://u@relay.test")


# -- subdomain_of and urls -----------------------------------------------------

ORIGIN = PublicOrigin.parse("http://relay.test")
ORIGIN_WITH_PORT = PublicOrigin.parse("https://relay.test:8443")


@pytest.mark.parametrize(
    ("host", "name"),
    [
        ("alice.relay.test", "alice"),
        ("alice-dev.relay.test", "alice-dev"),
        ("relay.test", None),  # the apex itself
        ("a.b.relay.test", None),  # one label only
        ("evil.alice.relay.test", None),
        ("alicerelay.test", None),  # a suffix match without the dot is another domain
        ("alice.relay.test.evil", None),
        ("alice.other.test", None),
        ("", None),
    ],
)
def test_subdomain_of_takes_exactly_one_label(host: str, name: str | None) -> None:
    assert ORIGIN.subdomain_of(host) == name


def test_subdomain_of_compares_against_the_host_without_port() -> None:
    assert ORIGIN_WITH_PORT.subdomain_of(normalize_host("Alice.Relay.Test:8443")) == "alice"


def test_subdomain_of_refuses_an_empty_label() -> None:
    assert ORIGIN.subdomain_of(".relay.test") is None


def test_urls_are_subdomain_then_path_form() -> None:
    assert ORIGIN.urls("alice") == ["http://alice.relay.test", "http://relay.test/t/alice"]
    assert ORIGIN.subdomain_url("alice") == "http://alice.relay.test"
    assert ORIGIN.path_url("alice") == "http://relay.test/t/alice"


def test_urls_keep_the_port_of_the_public_url() -> None:
    assert ORIGIN_WITH_PORT.urls("bob") == [
        "https://bob.relay.test:8443",
        "https://relay.test:8443/t/bob",
    ]


# -- names and patterns --------------------------------------------------------


@pytest.mark.parametrize("name", ["alice", "a", "alice-dev", "a1", "0day", "x" * 63])
def test_valid_names(name: str) -> None:
    assert is_valid_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "Alice",  # upper case: a name is compared byte for byte with the lower-cased host
        "-alice",
        "alice-",
        "al_ice",
        "alice.dev",
        "alice dev",
        "x" * 64,  # longer than a DNS label
        "alice*",
        "é",
    ],
)
def test_invalid_names(name: str) -> None:
    assert not is_valid_name(name)


def test_a_trailing_newline_is_not_part_of_a_valid_name() -> None:
    assert not is_valid_name("alice\n")
    assert not is_valid_pattern("alice\n")


@pytest.mark.parametrize("pattern", ["alice", "alice-*", "*", "*-bot", "a*b"])
def test_valid_patterns(pattern: str) -> None:
    assert is_valid_pattern(pattern)


@pytest.mark.parametrize("pattern", ["", "alice.*", "alice?", "[ab]lice", "Alice", "-alice", "alice-"])
def test_invalid_patterns(pattern: str) -> None:
    assert not is_valid_pattern(pattern)


def test_default_patterns_are_the_user_and_their_prefix() -> None:
    assert default_patterns("alice") == ["alice", "alice-*"]


@pytest.mark.parametrize(
    ("name", "allowed"),
    [
        ("alice", True),
        ("alice-dev", True),
        ("alice-x-y", True),
        ("bob", False),
        ("alicex", False),  # "alice-*" needs the dash
        ("xalice", False),
        ("ALICE", False),  # matching is case-sensitive
    ],
)
def test_name_allowed_by_the_default_patterns(name: str, allowed: bool) -> None:
    assert name_allowed(name, ["alice", "alice-*"]) is allowed


def test_name_allowed_needs_some_pattern() -> None:
    assert name_allowed("alice", []) is False
    assert name_allowed("bob", ["*"]) is True
