"""Where the inspector listens (``--inspect``), the Host names it answers, and binding."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest
from aiohttp.test_utils import unused_port

from relay_agent.config import AgentConfig
from relay_agent.errors import AgentConfigError
from relay_agent.inspector import address as address_module
from relay_agent.inspector.address import InspectAddress, default_address, parse_address
from relay_agent.inspector.app import BUSY_RESPONSE, MAX_CONNECTIONS, serve
from relay_agent.inspector.recorder import Recorder
from relay_agent.inspector.state import Inspector
from relay_agent.target import Target


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("4041", "127.0.0.1", 4041),
        ("127.0.0.1:5000", "127.0.0.1", 5000),
        ("[::1]:5000", "::1", 5000),
        ("0.0.0.0:4040", "0.0.0.0", 4040),
        ("laptop.lan:4040", "laptop.lan", 4040),
        ("localhost:4040", "127.0.0.1", 4040),  # loopback whatever /etc/hosts says
    ],
)
def test_parse_address(text: str, host: str, port: int) -> None:
    assert parse_address(text) == InspectAddress(host, port)


@pytest.mark.parametrize(
    "text", ["", "host", "host:", ":4040", "host:99999", "host:0", "h:1/path", "u@h:1", "x:y"]
)
def test_a_bad_address_names_the_option(text: str) -> None:
    with pytest.raises(AgentConfigError, match="--inspect"):
        parse_address(text)


@pytest.mark.parametrize(
    "text", ["99999", "host:99999", "0", "host:0", "host:abc", "host:-1", "\u00b2", "8\uff10"]
)
def test_a_bad_port_is_one_message(text: str) -> None:
    """urllib's words differ by case ("out of range 0-65535", "could not be cast");
    full-width and superscript digits are not a port."""
    with pytest.raises(AgentConfigError) as caught:
        parse_address(text)
    assert str(caught.value) in (
        f"invalid --inspect {text!r}: the port must be a number from 1 to 65535",
        f"invalid --inspect {text!r}: use PORT, HOST:PORT or [IPv6]:PORT",
    )
    assert "range 0-65535" not in str(caught.value) and "cast" not in str(caught.value)


def test_the_default_is_loopback_4040_and_the_next_ports() -> None:
    default = default_address()
    assert (default.host, default.port, default.exact) == ("127.0.0.1", 4040, False)
    assert [a.port for a in default.candidates()] == list(range(4040, 4050))
    assert parse_address("4040").candidates() == [InspectAddress("127.0.0.1", 4040)]


@pytest.mark.parametrize("text", ["::1:4050", "::", "fe80::1:80"])
def test_an_ipv6_address_without_brackets_is_told_to_use_them(text: str) -> None:
    with pytest.raises(AgentConfigError) as caught:
        parse_address(text)
    assert str(caught.value) == (
        f"invalid --inspect {text!r}: an IPv6 address goes in brackets, as [::1]:4050"
    )


def test_the_printed_url_reaches_a_wildcard_address_through_its_own_family() -> None:
    # "[::]:PORT" printed http://127.0.0.1:PORT, refused: the socket is IPv6 only.
    assert InspectAddress("::", 4050).url == "http://[::1]:4050"
    assert InspectAddress("0.0.0.0", 4050).url == "http://127.0.0.1:4050"
    assert InspectAddress("::1", 4050).url == "http://[::1]:4050"


@pytest.mark.parametrize(
    ("bound", "host", "allowed"),
    [
        (InspectAddress("127.0.0.1", 4040), "127.0.0.1:4040", True),
        (InspectAddress("127.0.0.1", 4040), "localhost:4040", True),
        (InspectAddress("127.0.0.1", 4040), "LOCALHOST:4040", True),
        (InspectAddress("127.0.0.1", 4040), "[::1]:4040", True),
        (InspectAddress("127.0.0.1", 4040), "127.0.0.1:4041", False),
        (InspectAddress("127.0.0.1", 4040), "127.0.0.1", False),
        (InspectAddress("127.0.0.1", 4040), "rebind.evil.example:4040", False),
        (InspectAddress("127.0.0.1", 4040), "localhost.evil.example:4040", False),
        (InspectAddress("127.0.0.1", 4040), "user@127.0.0.1:4040", False),
        (InspectAddress("127.0.0.1", 4040), "", False),
        (InspectAddress("127.0.0.1", 80), "127.0.0.1", True),
        (InspectAddress("::1", 4040), "[::1]:4040", True),
        (InspectAddress("192.168.1.5", 4040), "192.168.1.5:4040", True),
        (InspectAddress("192.168.1.5", 4040), "localhost:4040", False),  # not listening there
        (InspectAddress("0.0.0.0", 4040), "192.168.1.5:4040", True),  # an address is no name to rebind
        (InspectAddress("0.0.0.0", 4040), "laptop.lan:4040", False),
        (InspectAddress("laptop.lan", 4040), "laptop.lan:4040", True),
    ],
)
def test_the_hosts_an_inspector_answers(bound: InspectAddress, host: str, allowed: bool) -> None:
    assert bound.allows_host(host) is allowed
    assert bound.allows_origin(f"http://{host}") is allowed
    assert not bound.allows_origin(f"https://{host}")


def _inspector() -> Inspector:
    class Service:
        config = AgentConfig(server="http://relay.test", token="t", target=Target("http", "127.0.0.1", 9))
        client: aiohttp.ClientSession

    return Inspector(Recorder(), Service())


async def test_a_taken_default_port_moves_to_the_next() -> None:
    base = unused_port()
    with socket.create_server(("127.0.0.1", base)):
        address = InspectAddress("127.0.0.1", base, exact=False)
        async with serve(_inspector(), address) as bound:
            assert bound is not None and bound.port > base
            async with aiohttp.ClientSession() as http, http.get(f"{bound.url}/api/status") as response:
                assert response.status == 200


def test_a_port_taken_between_bind_and_listen_moves_to_the_next(monkeypatch: pytest.MonkeyPatch) -> None:
    # Several agents started at once: another process binds the port (SO_REUSEADDR, as
    # ours) and listens between our bind and our listen. uvloop then handed aiohttp a
    # server with its socket closed, TCPSite.start raised AttributeError and the agent
    # died at start. Now the sockets are ours: the listen fails with EADDRINUSE, and the
    # next port is taken. Run on uvloop, as the agent runs.
    uvloop = pytest.importorskip("uvloop")
    base = unused_port()
    competitors: list[socket.socket] = []
    real_bind = socket.socket.bind

    def bind_then_lose_the_race(self: socket.socket, address: object) -> None:
        real_bind(self, address)
        if not competitors:
            other = socket.socket(self.family, socket.SOCK_STREAM)
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            real_bind(other, address)
            other.listen()
            competitors.append(other)

    async def main() -> InspectAddress | None:
        async with serve(_inspector(), InspectAddress("127.0.0.1", base, exact=False)) as bound:
            assert bound is not None
            async with aiohttp.ClientSession() as http, http.get(f"{bound.url}/api/status") as response:
                assert response.status == 200
            return bound

    monkeypatch.setattr(socket.socket, "bind", bind_then_lose_the_race)
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            bound = runner.run(main())
    finally:
        for sock in competitors:
            sock.close()
    assert competitors and bound is not None and bound.port > base


async def test_a_taken_exact_port_is_an_error_naming_it() -> None:
    port = unused_port()
    with socket.create_server(("127.0.0.1", port)), pytest.raises(AgentConfigError) as caught:
        async with serve(_inspector(), InspectAddress("127.0.0.1", port)):
            pass
    assert str(caught.value).startswith(f"cannot serve the inspector on 127.0.0.1:{port}: ")


async def test_no_free_default_port_means_no_inspector(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(address_module, "DEFAULT_PORT_TRIES", 2)  # two ports to take, not ten
    taken = []
    base = unused_port()
    try:
        for address in InspectAddress("127.0.0.1", base, exact=False).candidates():
            try:
                taken.append(socket.create_server(("127.0.0.1", address.port)))
            except OSError:
                pytest.skip("a port of the range is in use elsewhere")
        async with serve(_inspector(), InspectAddress("127.0.0.1", base, exact=False)) as bound:
            assert bound is None
        assert f"no inspector: cannot listen on 127.0.0.1, ports {base} to {base + 1}" in caplog.text
    finally:
        for sock in taken:
            sock.close()


async def test_an_address_off_loopback_is_served_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    port = unused_port()
    async with serve(_inspector(), InspectAddress("0.0.0.0", port)) as bound:
        assert bound is not None and not bound.loopback
    assert "not on a loopback address: whoever can reach it can read and replay" in caplog.text
    caplog.clear()
    async with serve(_inspector(), InspectAddress("127.0.0.1", unused_port())):
        pass
    assert "loopback" not in caplog.text


async def test_a_name_that_does_not_resolve_says_so() -> None:
    with pytest.raises(AgentConfigError) as caught:
        async with serve(_inspector(), InspectAddress("nosuch.invalid", unused_port())):
            pass
    assert "cannot resolve the name" in str(caught.value) and "unknown error" not in str(caught.value).lower()


async def test_connections_over_the_cap_are_refused_and_the_page_still_answers() -> None:
    # Found by an attacker: idle connections to the inspector took every descriptor of
    # the agent, and forwarding failed with "too many open files".
    async with serve(_inspector(), InspectAddress("127.0.0.1", unused_port())) as bound:
        assert bound is not None
        idle = [await asyncio.open_connection("127.0.0.1", bound.port) for _ in range(MAX_CONNECTIONS)]
        reader, writer = await asyncio.open_connection("127.0.0.1", bound.port)
        assert await reader.read() == BUSY_RESPONSE  # then closed
        writer.close()
        for _, idle_writer in idle[:1]:
            idle_writer.close()
            await idle_writer.wait_closed()
        async with aiohttp.ClientSession() as http:
            async with asyncio.timeout(10):
                while True:  # the slot is free once the server has seen the close
                    async with http.get(f"{bound.url}/api/status") as response:
                        if response.status == 200:
                            break
                    await asyncio.sleep(0.01)
        for _, idle_writer in idle[1:]:
            idle_writer.close()
