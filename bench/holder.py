"""Many idle agents in one process, for the scale scenario (bench only, not an agent).

``RELAY_TOKEN=... python -m bench.holder --url ws://127.0.0.1:PORT/_relay/agent --count N``

It opens N protocol sessions (websockets + ``relay_protocol.Engine``), each its own
connection with HELLO for one name (``PREFIX0`` .. ``PREFIX{N-1}``, all claimable by the
one token), and keeps them alive: the engine answers the server's PINGs. An OPEN on any
of them is answered with the least there is: RESPONSE 200, then DATA "ok" with END.

It speaks to the bench with JSON lines on stdout, and waits for it on stdin::

    {"event": "first", "seconds": ...}                 the first session is welcomed
    (stdin: "go")                                       the bench measured what it needed
    {"event": "progress", "connected": ...}            every 1000 sessions
    {"event": "all", "connected": N, "failed": F, "seconds": ..., "error": "..."}

then holds the sessions until stdin closes or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from relay_protocol import PROTOCOL_VERSION, Engine, Hello, Open, ResponseHead, Role, Welcome
from relay_protocol.frames import RESET_CANCEL
from relay_protocol.limits import MAX_FRAME_SIZE

#: Handshakes in flight at once: more only overflows the server's listen backlog (128).
PARALLEL = 64
#: Seconds one connection and its HELLO/WELCOME may take.
HANDSHAKE_TIMEOUT = 60.0
ANSWER = ResponseHead(200, ((b"content-type", b"text/plain"), (b"content-length", b"2")))


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


class Held:
    """One idle agent session."""

    def __init__(self, ws: ClientConnection, name: str) -> None:
        self.ws = ws
        self.name = name
        self.engine = Engine(Role.AGENT, time.monotonic())

    async def _flush(self) -> None:
        while (data := self.engine.outgoing()) is not None:
            await self.ws.send(data)
            self.engine.sent()

    async def handshake(self) -> None:
        hello = Hello(PROTOCOL_VERSION, ({"name": self.name},), "relay-bench-holder", "bench")
        self.engine.send(hello, time.monotonic())
        await self._flush()
        message = await self.ws.recv()
        if not isinstance(message, bytes):
            raise RuntimeError("the server sent a text frame")
        frame = self.engine.receive(message, time.monotonic())
        if not isinstance(frame, Welcome):
            raise RuntimeError(f"expected WELCOME, got {type(frame).__name__}")

    async def serve(self) -> None:
        engine = self.engine
        try:
            async for message in self.ws:
                if not isinstance(message, bytes):
                    return
                now = time.monotonic()
                frame = engine.receive(message, now)  # a PING is answered inside
                if isinstance(frame, Open):
                    engine.respond(frame.stream_id, ANSWER, False, now)
                    engine.send_data(frame.stream_id, b"ok", True, now)
                    if not frame.end_stream:  # answered before the body: not reading it
                        engine.reset(frame.stream_id, RESET_CANCEL, "response complete", now)
                await self._flush()
        except Exception as exc:  # one session's end is not the holder's
            print(f"session {self.name}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)


async def open_session(url: str, token: str, name: str) -> Held:
    async with asyncio.timeout(HANDSHAKE_TIMEOUT):
        ws = await connect(
            url,
            additional_headers={"Authorization": f"Bearer {token}"},
            max_size=MAX_FRAME_SIZE,
            ping_interval=None,  # the protocol's own PING frames are the heartbeat
            compression=None,
            open_timeout=None,
            close_timeout=1,
        )
        held = Held(ws, name)
        await held.handshake()
    return held


async def hold(url: str, token: str, prefix: str, count: int) -> None:
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    tasks: set[asyncio.Task[None]] = set()

    def keep(held: Held) -> None:
        task = asyncio.create_task(held.serve())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    started = time.monotonic()
    keep(await open_session(url, token, f"{prefix}0"))
    emit("first", seconds=round(time.monotonic() - started, 3))
    if (await stdin.readline()).strip() != b"go":
        return
    gate = asyncio.Semaphore(PARALLEL)
    connected, failed, first_error = 1, 0, ""

    async def one(index: int) -> None:
        nonlocal connected, failed, first_error
        async with gate:
            try:
                keep(await open_session(url, token, f"{prefix}{index}"))
            except Exception as exc:
                failed += 1
                first_error = first_error or f"{prefix}{index}: {type(exc).__name__}: {exc}"
                return
        connected += 1
        if connected % 1000 == 0:
            emit("progress", connected=connected, seconds=round(time.monotonic() - started, 3))

    started = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(1, count)))
    emit(
        "all",
        connected=connected,
        failed=failed,
        seconds=round(time.monotonic() - started, 3),
        error=first_error,
        rss_kib=int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]),
    )
    await stdin.read()  # until the bench closes our stdin


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.holder", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="the server's agent endpoint (ws://...)")
    parser.add_argument("--count", type=int, required=True, help="sessions to open")
    parser.add_argument("--prefix", default="scale-", help="names are PREFIX0 .. PREFIX{N-1}")
    args = parser.parse_args()
    # One descriptor per session, and some: raise the soft limit to the hard one.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if limit != resource.RLIM_INFINITY and limit < args.count + 64:
        print(f"RLIMIT_NOFILE {limit} is too low for {args.count} sessions", file=sys.stderr)
        sys.exit(2)
    asyncio.run(hold(args.url, os.environ["RELAY_TOKEN"], args.prefix, args.count))
    os._exit(0)  # closing thousands of sessions one by one tells the bench nothing


if __name__ == "__main__":
    main()
