"""The JSON the inspector's API gives for an exchange: a summary for the list, a detail view.

Header names and values, the method and the target are bytes on the wire; here they
are text decoded as UTF-8 with ``surrogateescape``: UTF-8 reads as it should, and any
other byte survives the round trip through the page (JSON carries it as a lone
surrogate, ``\\udcXX``), so an edited replay sends back exactly the bytes it was shown.
``replay.encode`` undoes it.
"""

from __future__ import annotations

import functools
import json
from datetime import UTC, datetime
from typing import Any

from relay_protocol.headers import header_value, is_websocket_upgrade
from relay_protocol.heads import Headers

from .bodies import render
from .recorder import Capture, Exchange

#: The API's JSON: strict, never NaN or Infinity (the page's parser refuses them).
strict_dumps = functools.partial(json.dumps, allow_nan=False)


def text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def headers_json(headers: Headers) -> list[list[str]]:
    return [[text(name), text(value)] for name, value in headers]


def milliseconds(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def summary(exchange: Exchange) -> dict[str, Any]:
    """One line of the list::

    {"id": 7, "replay_of": 3 or null, "time": ISO 8601, "method": "POST",
     "target": "/hook?x=1", "status": 200 | "reset" | null (running), "error": "",
     "duration_ms": 12.5 or null, "request_size": 42, "response_size": 2,
     "event_id": "evt_..." or null, "attempt": 2 or null}
    """
    head = exchange.head
    response_size = exchange.response.size if exchange.response_head is not None else None
    return {
        "id": exchange.id,
        "replay_of": exchange.replay_of,
        "time": datetime.fromtimestamp(exchange.received_at, UTC).isoformat(timespec="milliseconds"),
        "method": head.method,
        "target": text(head.target),
        "status": exchange.status,
        "error": exchange.error,
        "duration_ms": milliseconds(exchange.duration),
        "request_size": exchange.request.size,
        "response_size": response_size,
        "event_id": head.event_id or None,
        "attempt": exchange.attempt,
    }


def replay_refusal(exchange: Exchange) -> str | None:
    """Why ``exchange`` cannot be replayed or copied as curl as it was, or None."""
    if is_websocket_upgrade(exchange.head.method, exchange.head.headers):
        return "a websocket cannot be replayed"
    if not exchange.request.complete:
        if exchange.request.dropped or exchange.request.kept < exchange.request.size:
            return f"its body of {exchange.request.size} bytes was not kept whole"
        return "its body has not arrived whole"
    return None


class BodySource:
    """A body as it stood when the page asked: what ``render`` needs, taken on the event
    loop (the recorder keeps adding to a running exchange's), rendered later in a thread:
    ``render`` is linear in the body, but a megabyte of JSON still takes a quarter
    second the tunnel's streams should not wait for."""

    __slots__ = ("complete", "content_type", "data", "dropped", "encoding", "size")

    def __init__(self, capture: Capture, headers: Headers) -> None:
        self.dropped = capture.dropped
        self.size = capture.size
        self.complete = capture.complete
        self.data = b"" if capture.dropped else capture.data()
        content_type = header_value(headers, b"content-type")
        encoding = header_value(headers, b"content-encoding")
        self.content_type = content_type.decode("latin-1") if content_type is not None else None
        self.encoding = encoding.decode("latin-1") if encoding is not None else None

    def view(self) -> dict[str, Any]:
        if self.dropped:
            # Let go to stay within the recorder's budget: its size is all that is left.
            return {"kind": "dropped", "size": self.size, "shown": 0, "dropped": True}
        shown = render(self.data, self.content_type, self.encoding, complete=self.complete)
        shown["size"] = self.size  # the whole body's, not only the kept bytes'
        return shown


def detail(exchange: Exchange) -> dict[str, Any]:
    """The summary, plus::

        "client": "203.0.113.9",
        "request": {"method", "target", "headers": [[name, value], ...], "body": BODY},
        "response": {"status": 200, "headers": [...], "body": BODY} or null,
        "timing": {"response_after_ms": 3.2 or null, "duration_ms": 12.5 or null},
        "replayable": true, "why_not_replayable": null or "its body of ... bytes was not kept whole"

    with BODY a ``BodySource`` until ``detail_json`` renders it: as ``bodies.render``
    makes it (its ``size`` always the whole body's), or ``{"kind": "dropped", "size": N,
    "shown": 0, "dropped": true}`` for a body the recorder let go (``recorder.MAX_KEPT``).
    """
    head = exchange.head
    response = exchange.response_head
    refusal = replay_refusal(exchange)
    return {
        **summary(exchange),
        "client": head.client,
        "request": {
            "method": head.method,
            "target": text(head.target),
            "headers": headers_json(head.headers),
            "body": BodySource(exchange.request, head.headers),
        },
        "response": None
        if response is None
        else {
            "status": response.status,
            "headers": headers_json(response.headers),
            "body": BodySource(exchange.response, response.headers),
        },
        "timing": {
            "response_after_ms": milliseconds(exchange.response_after),
            "duration_ms": milliseconds(exchange.duration),
        },
        "replayable": refusal is None,
        "why_not_replayable": refusal,
    }


def detail_json(view: dict[str, Any]) -> str:
    """``detail``'s view with its bodies rendered, as strict JSON: called in a thread."""
    for side in (view["request"], view["response"]):
        if side is not None:
            side["body"] = side["body"].view()
    return strict_dumps(view)
