"""``relay_web.listen``: listening sockets made before the loop serves them."""

from __future__ import annotations

import socket

import pytest

from relay_web.listen import authority, listening_sockets


def test_port_0_listens_on_one_port_at_every_address() -> None:
    # Every interface (IPv4 and IPv6 where the machine has both): one port for all, as a
    # URL can name only one.
    sockets = listening_sockets(None, 0)
    try:
        ports = {sock.getsockname()[1] for sock in sockets}
        assert len(ports) == 1 and 0 not in ports
    finally:
        for sock in sockets:
            sock.close()


def test_a_taken_port_raises_with_nothing_left_open() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError):
            listening_sockets("127.0.0.1", port)


@pytest.mark.parametrize(
    ("host", "port", "expected"), [("127.0.0.1", 80, "127.0.0.1:80"), ("::1", 4040, "[::1]:4040")]
)
def test_authority_brackets_ipv6(host: str, port: int, expected: str) -> None:
    assert authority(host, port) == expected
