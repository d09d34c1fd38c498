"""``ingress.route``: which tunnel (or server page) a Host and raw target reach."""

from __future__ import annotations

import pytest

from relay_server.ingress import ApexRoute, BadTarget, TunnelRoute, route
from relay_server.names import PublicOrigin

ORIGIN = PublicOrigin.parse("http://relay.test")
APEX = "relay.test"

# -- subdomain form ------------------------------------------------------------


@pytest.mark.parametrize("target", ["/", "/hook", "/hook?x=1&y=%20", "/a/../b", "/t/bob/x"])
def test_subdomain_form_forwards_the_target_untouched(target: str) -> None:
    assert route("alice.relay.test", target, ORIGIN) == TunnelRoute("alice", target, "")


def test_subdomain_form_wins_over_a_path_prefix() -> None:
    # On alice's host, /t/bob is alice's own path, never bob's tunnel.
    assert route("alice.relay.test", "/t/bob", ORIGIN) == TunnelRoute("alice", "/t/bob", "")


def test_a_deeper_subdomain_is_not_a_tunnel() -> None:
    assert route("x.alice.relay.test", "/healthz", ORIGIN) == ApexRoute("/healthz")


# -- path form -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "forwarded"),
    [
        ("/t/alice", "/"),
        ("/t/alice/", "/"),
        ("/t/alice?x=1", "/?x=1"),
        ("/t/alice/x?y", "/x?y"),
        ("/t/alice/hooks/github", "/hooks/github"),
        ("/t/alice//double", "//double"),
        ("/t/alice/a%2Fb?q=%2e%2e", "/a%2Fb?q=%2e%2e"),  # encodings are passed, not decoded
    ],
)
def test_path_form_strips_the_prefix(target: str, forwarded: str) -> None:
    assert route(APEX, target, ORIGIN) == TunnelRoute("alice", forwarded, "/t/alice")


@pytest.mark.parametrize(
    ("target", "name", "forwarded"),
    [
        ("/t/alice-x", "alice-x", "/"),
        ("/t/alice-x/y", "alice-x", "/y"),
        ("/t/alicex?z", "alicex", "/?z"),
    ],
)
def test_a_longer_name_is_not_under_alices_prefix(target: str, name: str, forwarded: str) -> None:
    where = route(APEX, target, ORIGIN)
    assert where == TunnelRoute(name, forwarded, f"/t/{name}")
    assert where.name != "alice"


def test_a_name_followed_by_neither_slash_nor_query_is_no_tunnel() -> None:
    assert route(APEX, "/t/alice#frag", ORIGIN) == ApexRoute("/t/alice#frag")


@pytest.mark.parametrize(
    "target",
    [
        "/t/alice/..",
        "/t/alice/../bob",
        "/t/alice/../bob/hook",
        "/t/alice/x/../../bob",
        "/t/alice/%2e%2e/bob",
        "/t/alice/%2E%2E/bob",
        "/t/alice/%2e%2E/bob",
        "/t/alice/.%2e/bob",
        "/t/alice/%2e./bob",
        "/t/alice/./../bob",
        "/t/alice/../bob?x=1",
    ],
)
def test_dot_segments_leaving_the_prefix_are_refused(target: str) -> None:
    with pytest.raises(BadTarget, match="dot-segments"):
        route(APEX, target, ORIGIN)


@pytest.mark.parametrize(
    ("target", "forwarded"),
    [
        ("/t/alice/x/..", "/x/.."),
        ("/t/alice/x/../y", "/x/../y"),
        ("/t/alice/x/%2e%2e/y", "/x/%2e%2e/y"),
        ("/t/alice/./x", "/./x"),
        ("/t/alice/a/b/../../c", "/a/b/../../c"),
        ("/t/alice/...", "/..."),  # three dots are a plain name
        ("/t/alice/..x", "/..x"),
        ("/t/alice/x?next=../../bob", "/x?next=../../bob"),  # the query is not a path
    ],
)
def test_dot_segments_staying_inside_are_allowed(target: str, forwarded: str) -> None:
    assert route(APEX, target, ORIGIN) == TunnelRoute("alice", forwarded, "/t/alice")


# -- apex ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "target", "path"),
    [
        (APEX, "/healthz", "/healthz"),
        (APEX, "/healthz?verbose=1", "/healthz"),
        (APEX, "/_relay/agent", "/_relay/agent"),
        (APEX, "/", "/"),
        (APEX, "/tunnels/alice", "/tunnels/alice"),
        (APEX, "/t", "/t"),
        ("127.0.0.1", "/healthz", "/healthz"),  # any other host is the server itself
        ("other.test", "/t2/alice", "/t2/alice"),
    ],
)
def test_apex_routes(host: str, target: str, path: str) -> None:
    assert route(host, target, ORIGIN) == ApexRoute(path)


def test_path_form_works_on_any_host_that_is_not_a_subdomain() -> None:
    assert route("127.0.0.1", "/t/alice/x", ORIGIN) == TunnelRoute("alice", "/x", "/t/alice")
