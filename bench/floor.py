"""The floor: the least a Python relay can do, measured beside the relay.

The small scenario runs it as a fifth path: what a throwaway relay on the relay's own
stack (aiohttp for the public side and the websocket, uvloop where it installs) costs
per webhook on this machine, in the same run. The relay's figures over the floor's say
how much of the relay's cost is its own work, and how much any Python relay pays
(issue 10 quotes such a relay at about 0.22 ms of server and 0.29 ms of agent CPU per
request, measured on its author's machine)::

    python -m bench.floor server PORT            # public HTTP; its agent connects to /_floor
    python -m bench.floor agent PORT TARGET_PORT # forwards every request to 127.0.0.1:TARGET_PORT

One request is one websocket message each way (a 4-byte stream id, the head's length,
the head as JSON, the body). Left out, each of which the relay pays for: bodies are
read whole (no streaming, no flow control, no limits), no authentication or tenants, no
store, no inspector, no metrics or request ids, no header checks beyond dropping the
hop-by-hop ones, no timeouts, no reconnect. Not a product: a yardstick.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import struct
import sys
from collections.abc import Callable
from typing import cast

import aiohttp
from aiohttp import web

#: A message's prefix: the stream id and the length of the JSON head that follows.
PREFIX = struct.Struct("!II")
AGENT_PATH = "/_floor"
#: Headers a relay cannot pass on as they are (RFC 9110 section 7.6.1) or that the
#: HTTP library on the far side sets from the body it sends.
HOP_BY_HOP = frozenset(
    ("connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "content-length")
)


def _message(stream: int, head: object, body: bytes) -> bytes:
    encoded = json.dumps(head).encode()
    return PREFIX.pack(stream, len(encoded)) + encoded + body


def _parse(data: bytes) -> tuple[int, object, bytes]:
    stream, length = PREFIX.unpack_from(data)
    end = PREFIX.size + length
    return stream, json.loads(data[PREFIX.size : end]), data[end:]


def _forwarded(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP]


def server_app() -> web.Application:
    agent: list[web.WebSocketResponse] = []
    waiting: dict[int, asyncio.Future[tuple[object, bytes]]] = {}
    ids = itertools.count(1)

    async def connect(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        agent[:] = [ws]
        async for message in ws:
            stream, head, body = _parse(message.data)
            future = waiting.pop(stream, None)
            if future is not None and not future.done():
                future.set_result((head, body))
        return ws

    async def public(request: web.Request) -> web.StreamResponse:
        if not agent:
            return web.Response(status=503, text="no agent\n")
        body = await request.read()
        stream = next(ids)
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers]
        future = waiting[stream] = asyncio.get_running_loop().create_future()
        try:
            await agent[0].send_bytes(_message(stream, [request.method, request.raw_path, headers], body))
            head, answer = await future
            status, answer_headers = cast(tuple[int, list[tuple[str, str]]], head)
        finally:
            waiting.pop(stream, None)
        return web.Response(status=status, headers=_forwarded(answer_headers), body=answer)

    app = web.Application()
    app.router.add_get(AGENT_PATH, connect)
    app.router.add_route("*", "/{tail:.*}", public)
    return app


async def run_agent(port: int, target_port: int) -> None:
    tasks: set[asyncio.Task[None]] = set()
    connector = aiohttp.TCPConnector(limit=0)
    async with (
        aiohttp.ClientSession(connector=connector, auto_decompress=False) as http,
        http.ws_connect(f"http://127.0.0.1:{port}{AGENT_PATH}", max_msg_size=0) as ws,
    ):

        async def forward(data: bytes) -> None:
            stream, head, body = _parse(data)
            method, target, headers = cast(tuple[str, str, list[tuple[str, str]]], head)
            url = f"http://127.0.0.1:{target_port}{target}"
            sent = [(k, v) for k, v in _forwarded(headers) if k.lower() != "host"]
            async with http.request(method, url, headers=sent, data=body, allow_redirects=False) as resp:
                answer = await resp.read()
                got = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in resp.raw_headers]
            await ws.send_bytes(_message(stream, [resp.status, got], answer))

        async for message in ws:
            task = asyncio.create_task(forward(message.data))
            tasks.add(task)
            task.add_done_callback(_finished(tasks))


def _finished(tasks: set[asyncio.Task[None]]) -> Callable[[asyncio.Task[None]], None]:
    def done(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            print(f"floor agent: a request failed: {exc!r}", file=sys.stderr)

    return done


def _event_loop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main(argv: list[str]) -> int:
    _event_loop()
    if len(argv) == 2 and argv[0] == "server":
        web.run_app(server_app(), host="127.0.0.1", port=int(argv[1]), print=None, access_log=None)
        return 0
    if len(argv) == 3 and argv[0] == "agent":
        asyncio.run(run_agent(int(argv[1]), int(argv[2])))
        return 0
    print("usage: python -m bench.floor server PORT | agent PORT TARGET_PORT", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
