"""The bench's local service in aiohttp, used when node is not installed.

``python -m bench.target_app PORT``; the same endpoints as bench/target.js (see
``bench.processes.Target``).
"""

from __future__ import annotations

import sys

from aiohttp import web
from aiohttp.typedefs import Handler

CHUNK = b"x" * (64 * 1024)
#: Distinct X-Relay-Event-Id seen (GET /counts): a retried webhook counts once.
EVENTS: web.AppKey[set[str]] = web.AppKey("events", set)


@web.middleware
async def count_events(request: web.Request, handler: Handler) -> web.StreamResponse:
    event = request.headers.get("X-Relay-Event-Id")
    if event is not None:
        request.app[EVENTS].add(event)
    return await handler(request)


async def counts(request: web.Request) -> web.Response:
    return web.json_response({"events": len(request.app[EVENTS])})


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def upload(request: web.Request) -> web.Response:
    length = 0
    async for chunk in request.content.iter_any():  # read and discarded
        length += len(chunk)
    return web.json_response({"length": length})


async def download(request: web.Request) -> web.StreamResponse:
    total = int(request.query.get("bytes", "0"))
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = total
    await response.prepare(request)
    left = total
    while left > 0:
        piece = CHUNK if left >= len(CHUNK) else CHUNK[:left]
        await response.write(piece)  # waits while the client is slower: never the whole body
        left -= len(piece)
    await response.write_eof()
    return response


async def hook(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=b'{"ok":true}', content_type="application/json")


def main() -> None:
    app = web.Application(client_max_size=1 << 40, middlewares=[count_events])
    app[EVENTS] = set()
    app.router.add_get("/counts", counts)
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/upload", upload)
    app.router.add_get("/download", download)
    app.router.add_route("*", "/{tail:.*}", hook)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
