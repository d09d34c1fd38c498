"""WebSocket upgrades through the tunnel: messages, pings, close codes, both ways at once."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from .framework import Relay, client_session, until
from .streaming_targets import StreamingTarget


def _start(relay: Relay, target: StreamingTarget, *server_options: str) -> tuple[str, str]:
    """A server and an agent for ``target``; returns the two public websocket URLs (as HTTP)."""
    server = relay.server(*server_options)
    relay.agent(server, server.token("wsuser"), target.forward)
    return f"http://127.0.0.1:{server.port}/t/wsuser/ws", server.apex


async def _connect(session: aiohttp.ClientSession, url: str, apex: str, **kwargs: object):
    return await session.ws_connect(url, headers={"Host": apex}, autoping=False, **kwargs)


async def test_text_binary_and_large_messages_round_trip(relay: Relay, target: StreamingTarget) -> None:
    url, apex = _start(relay, target)
    async with client_session() as session, await _connect(session, url, apex) as ws:
        await ws.send_str("hello")
        assert (await ws.receive()).data == "echo:hello"
        await ws.send_str("héllo wörld ✓")
        assert (await ws.receive()).data == "echo:héllo wörld ✓"
        await ws.send_bytes(b"\x00\x01\x02\xff")
        msg = await ws.receive()
        assert msg.type is aiohttp.WSMsgType.BINARY and msg.data == b"\xff\x02\x01\x00"
        big = bytes(range(256)) * 4096  # 1 MiB: spans many DATA frames
        await ws.send_bytes(big)
        assert (await ws.receive()).data == big[::-1]


async def test_subdomain_form_and_subprotocol(relay: Relay, target: StreamingTarget) -> None:
    server = relay.server()
    relay.agent(server, server.token("wsuser"), target.forward)
    url = f"http://127.0.0.1:{server.port}/ws"
    async with client_session() as session:
        async with await _connect(session, url, f"wsuser.{server.apex}", protocols=("v2", "other")) as ws:
            assert ws.protocol == "v2"
            await ws.send_str("sub")
            assert (await ws.receive()).data == "echo:sub"


async def test_pings_and_pongs_are_relayed_end_to_end(relay: Relay, target: StreamingTarget) -> None:
    url, apex = _start(relay, target)
    async with client_session() as session, await _connect(session, url, apex) as ws:
        await ws.ping(b"are you there")
        msg = await ws.receive(timeout=10)
        # The local service (aiohttp, autoping on) answered; the relay did not answer for it.
        assert msg.type is aiohttp.WSMsgType.PONG
        assert msg.data == b"are you there"


async def test_close_code_from_the_local_service_reaches_the_client(
    relay: Relay, target: StreamingTarget
) -> None:
    url, apex = _start(relay, target)
    async with client_session() as session, await _connect(session, url, apex) as ws:
        await ws.send_str("close 4001")
        msg = await ws.receive(timeout=10)
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert msg.data == 4001
        assert msg.extra == "bye"


async def test_close_code_from_the_client_reaches_the_local_service(
    relay: Relay, target: StreamingTarget
) -> None:
    url, apex = _start(relay, target)
    async with client_session() as session:
        ws = await _connect(session, url, apex)
        await ws.send_str("ping-pong first")
        assert (await ws.receive()).data == "echo:ping-pong first"
        await ws.close(code=4321, message=b"client leaves")
    await until(lambda: target.close_codes, 20, "the close to reach the local service")
    assert target.close_codes == [4321]


async def test_both_directions_at_once(relay: Relay, target: StreamingTarget) -> None:
    url, apex = _start(relay, target)
    async with client_session() as session, await _connect(session, url, apex) as ws:
        count = 300
        await ws.send_str(f"push {count}")

        async def send() -> None:
            for i in range(count):
                await ws.send_str(f"mine {i}")

        sender = asyncio.create_task(send())
        received = []
        while len(received) < 2 * count:
            msg = await ws.receive(timeout=20)
            received.append(msg.data)
        await sender
    pushed = [m for m in received if m.startswith("pushed ")]
    echoed = [m for m in received if m.startswith("echo:mine ")]
    assert pushed == [f"pushed {i}" for i in range(count)]
    assert echoed == [f"echo:mine {i}" for i in range(count)]


async def test_many_websockets_share_one_agent(relay: Relay, target: StreamingTarget) -> None:
    url, apex = _start(relay, target)
    async with client_session() as session:

        async def one(i: int) -> str:
            async with await _connect(session, url, apex) as ws:
                await ws.send_str(f"socket {i}")
                return (await ws.receive(timeout=20)).data

        answers = await asyncio.gather(*(one(i) for i in range(40)))
    assert answers == [f"echo:socket {i}" for i in range(40)]


async def test_a_refused_upgrade_is_an_ordinary_response(relay: Relay, target: StreamingTarget) -> None:
    server = relay.server()
    relay.agent(server, server.token("wsuser"), target.forward)
    async with client_session() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(
                f"http://127.0.0.1:{server.port}/t/wsuser/no-such-socket", headers={"Host": server.apex}
            )
    assert refused.value.status == 404


async def test_an_idle_websocket_is_closed_after_the_idle_limit(
    relay: Relay, target: StreamingTarget
) -> None:
    url, apex = _start(relay, target, "--idle-timeout", "1")
    async with client_session() as session, await _connect(session, url, apex) as ws:
        await ws.send_str("still here")
        assert (await ws.receive()).data == "echo:still here"
        msg = await ws.receive(timeout=15)
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert msg.data == 1001
