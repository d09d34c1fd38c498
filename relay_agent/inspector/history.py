"""The server's history of this agent's tunnels, for the inspector's page::

    GET  /api/server/events?name=&status=&before=   {"events": [...], "next": CURSOR or null}
    GET  /api/server/events/ID                      the event, its body and every attempt
    POST /api/server/events/ID/replay               redeliver it through the server (same id)

Each call is the server's own events API (``/_relay/api/events``, see the README) made
by the inspector's backend with the agent's token: the page never sees the token. The
server's refusals (400, 404, 409) come back with their status and message; a server
that cannot be reached, or fails, is a 502.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from relay_protocol import RelayError

from .. import api_client
from .bodies import render
from .recorder import MAX_BODY
from .state import INSPECTOR, Inspector, api_error
from .views import strict_dumps

#: Events per page of the history: a screenful, fetched again as the page scrolls.
HISTORY_PAGE = 50
#: An event id as the server makes them (``evt_`` and URL-safe characters): anything else
#: is refused here rather than put into the server's URL.
_EVENT_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")
_STATUSES = ("pending", "retrying", "delivered", "dead")

routes = web.RouteTableDef()


async def _call(inspector: Inspector, method: str, path: str, with_view: bool = False) -> web.Response:
    config = inspector.service.config
    try:
        answer: Any = await asyncio.to_thread(
            api_client.call, config.server, config.token, method, path, None, config.tls
        )
    except api_client.ApiError as exc:
        if exc.status is not None and 400 <= exc.status < 500 and exc.status != 401:
            return api_error(exc.status, "server-refused", str(exc))
        return api_error(502, "server-unavailable", f"the relay server: {exc}")
    except RelayError as exc:
        return api_error(502, "server-unavailable", f"the relay server: {exc}")
    # An event's body (up to the server's 10 MiB) is decoded, rendered and encoded again
    # in the render thread; a page of the list is small.
    text = await inspector.render(_with_view, answer) if with_view else strict_dumps(answer)
    return web.Response(text=text, status=202 if method == "POST" else 200, content_type="application/json")


@routes.get("/api/server/events")
async def events(request: web.Request) -> web.Response:
    inspector = request.app[INSPECTOR]
    query = {"limit": str(HISTORY_PAGE)}
    name = request.query.get("name", "")
    if name:
        if name not in inspector.names:
            return api_error(
                400, "bad-request", f"name must be one of this agent's: {', '.join(inspector.names)}"
            )
        query["name"] = name
    status = request.query.get("status", "")
    if status:
        if status not in _STATUSES:
            return api_error(400, "bad-request", f"status must be one of {', '.join(_STATUSES)}")
        query["status"] = status
    if before := request.query.get("before", ""):
        query["before"] = before  # opaque: the server checks it
    return await _call(inspector, "GET", f"events?{urlencode(query)}")


def _event_id(request: web.Request) -> str:
    event_id = request.match_info["id"]
    if not _EVENT_ID.match(event_id):
        raise web.HTTPBadRequest(
            text='{"error": "bad-request", "message": "not an event id"}', content_type="application/json"
        )
    return event_id


@routes.get("/api/server/events/{id}")
async def event(request: web.Request) -> web.Response:
    """The server's view of the event, plus ``body_view``: its body as ``bodies.render``
    shows it (the page draws an event's body as it draws an exchange's)."""
    return await _call(request.app[INSPECTOR], "GET", f"events/{_event_id(request)}", with_view=True)


def _with_view(answer: Any) -> str:
    """The server's event as JSON text, with ``body_view``."""
    if isinstance(answer, dict):
        answer["body_view"] = _body_view(answer)
    return strict_dumps(answer)


def _body_view(event: dict[str, Any]) -> dict[str, Any]:
    """The event's body as the page shows an exchange's: its first ``MAX_BODY`` bytes
    (the server keeps up to 10 MiB; a view of the rest is the raw bytes' job)."""
    text = str(event.get("body", ""))
    try:
        body = base64.b64decode(text) if event.get("body_encoding") == "base64" else text.encode("utf-8")
    except (ValueError, binascii.Error):
        body = text.encode("utf-8", "replace")
    headers = {str(k).lower(): str(v) for k, v in event.get("headers", [])}
    complete = len(body) <= MAX_BODY
    kept = body[:MAX_BODY]
    shown = render(kept, headers.get("content-type"), headers.get("content-encoding"), complete=complete)
    shown["size"] = len(body)
    return shown


@routes.post("/api/server/events/{id}/replay")
async def redeliver(request: web.Request) -> web.Response:
    return await _call(request.app[INSPECTOR], "POST", f"events/{_event_id(request)}/replay")
