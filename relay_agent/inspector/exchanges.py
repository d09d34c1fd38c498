"""The inspector API's calls on the exchanges this agent recorded::

GET  /api/exchanges                        {"exchanges": [SUMMARY, ...]}, newest first
GET  /api/exchanges/stream                 server-sent events: "exchange" with a SUMMARY,
                                           when one starts and when it ends
GET  /api/exchanges/ID                     DETAIL (views.detail)
GET  /api/exchanges/ID/request/body        the kept bytes as they are; 410 when the
GET  /api/exchanges/ID/response/body       recorder let the body go (MAX_KEPT)
GET  /api/exchanges/ID/curl                {"command": "curl ..."}
POST /api/exchanges/ID/replay              edits (replay.edited) -> 202 {"exchange": SUMMARY}
"""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from relay_protocol.headers import header_value

from ..forward import outgoing_headers
from .bodies import media_type
from .curl import curl_command
from .recorder import MAX_BODY, Exchange, TooManySubscribers
from .replay import EditRefused, edited, start_replay
from .state import INSPECTOR, api_error, error_code
from .views import detail, detail_json, replay_refusal, summary

#: Seconds between two comments on a quiet event stream: a page that went away is
#: noticed (the write fails), and no proxy in between takes the stream for dead.
KEEPALIVE = 15.0
#: Largest replay request the API reads: an edited body of MAX_BODY bytes as JSON text,
#: where a byte may take six characters (``\u00e9``, or ``\udcff`` for one that is not
#: UTF-8), and 1 MiB more for the method, target and headers.
MAX_REPLAY_REQUEST = 6 * MAX_BODY + 1024 * 1024
#: Body types served with their own type, to be shown by an ``<img>``; anything else is
#: served as application/octet-stream, never as a page of the inspector's origin (an
#: HTML or SVG body would run its scripts there).
_INLINE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp", "image/bmp", "image/x-icon"})

routes = web.RouteTableDef()


def _exchange(request: web.Request) -> Exchange:
    """The exchange the path names. Raises ``HTTPNotFound`` (a JSON error)."""
    raw = request.match_info["id"]
    exchange = (
        request.app[INSPECTOR].recorder.get(int(raw))
        if raw.isascii() and raw.isdigit() and len(raw) < 12
        else None
    )
    if exchange is None:
        message = f"no exchange {raw[:32]!r}: it may be older than the ones kept"
        raise web.HTTPNotFound(
            text=json.dumps({"error": "not-found", "message": message}), content_type="application/json"
        )
    return exchange


@routes.get("/api/exchanges")
async def list_exchanges(request: web.Request) -> web.Response:
    recorder = request.app[INSPECTOR].recorder
    return web.json_response({"exchanges": [summary(e) for e in recorder.newest_first()]})


@routes.get("/api/exchanges/stream")
async def stream(request: web.Request) -> web.StreamResponse:
    recorder = request.app[INSPECTOR].recorder
    try:
        queue = recorder.subscribe()
    except TooManySubscribers as exc:
        return api_error(503, "too-many-pages", str(exc))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"})
    try:
        await response.prepare(request)
        await response.write(b": relay inspector\n\n")
        while True:
            try:
                async with asyncio.timeout(KEEPALIVE):
                    exchange = await queue.get()
            except TimeoutError:
                await response.write(b": keepalive\n\n")
                continue
            if exchange is None:  # dropped (too far behind) or the agent stops: the page reconnects
                break
            await response.write(
                b"event: exchange\ndata: " + json.dumps(summary(exchange)).encode() + b"\n\n"
            )
    except ConnectionError:
        pass  # the page went away (reset, or aiohttp's "Connection lost")
    finally:
        recorder.unsubscribe(queue)
    return response


@routes.get("/api/exchanges/{id}")
async def show(request: web.Request) -> web.Response:
    view = detail(_exchange(request))
    text = await request.app[INSPECTOR].render(detail_json, view)
    return web.Response(text=text, content_type="application/json")


@routes.get("/api/exchanges/{id}/{side:request|response}/body")
async def body(request: web.Request) -> web.Response:
    exchange = _exchange(request)
    if request.match_info["side"] == "request":
        capture, headers = exchange.request, exchange.head.headers
    else:
        capture = exchange.response
        headers = exchange.response_head.headers if exchange.response_head is not None else ()
    if capture.dropped:
        side = request.match_info["side"]
        message = f"the {side} body of exchange {exchange.id} ({capture.size} bytes) is no longer kept"
        return api_error(410, "gone", message)
    declared = header_value(headers, b"content-type")
    kind, _ = media_type(declared.decode("latin-1") if declared is not None else None)
    inline = kind in _INLINE_TYPES and header_value(headers, b"content-encoding") is None
    return web.Response(
        body=capture.data(),
        content_type=kind if inline else "application/octet-stream",
        headers={
            "Content-Disposition": "inline"
            if inline
            else f'attachment; filename="exchange-{exchange.id}-{request.match_info["side"]}.bin"',
            "Content-Security-Policy": "sandbox; default-src 'none'",
        },
    )


@routes.get("/api/exchanges/{id}/curl")
async def curl(request: web.Request) -> web.Response:
    exchange = _exchange(request)
    if (refusal := replay_refusal(exchange)) is not None:
        return api_error(409, "conflict", f"cannot copy this exchange as curl: {refusal}")
    config = request.app[INSPECTOR].service.config
    insecure = config.target.scheme == "https" and config.forward_tls is False
    command = curl_command(
        exchange.head.method,
        config.target.base_url,
        exchange.head.target,
        outgoing_headers(exchange.head, config),
        exchange.request.data(),
        insecure=insecure,
    )
    return web.json_response({"command": command})


@routes.post("/api/exchanges/{id}/replay")
async def replay(request: web.Request) -> web.Response:
    inspector = request.app[INSPECTOR]
    original = _exchange(request)
    raw = await request.read()  # at most MAX_REPLAY_REQUEST (client_max_size), else 413
    try:
        edits = json.loads(raw) if raw.strip() else {}
    except RecursionError:
        return api_error(400, "bad-request", "the replay's edits are nested too deeply")
    except ValueError as exc:
        return api_error(400, "bad-request", f"the replay's edits are not JSON: {exc}")
    try:
        head, body_bytes = edited(original, edits)
    except EditRefused as exc:
        return api_error(exc.status, error_code(exc.status), str(exc))
    exchange = start_replay(
        inspector.service, inspector.recorder, inspector.background, head, body_bytes, original.id
    )
    return web.json_response({"exchange": summary(exchange)}, status=202)
