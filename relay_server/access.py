"""What the server notes about every public request: its request id, the access log
line (``--access-log``) and the request metrics.

The request id is the client's ``X-Request-Id`` when it is a sane token (as Heroku's
router and most proxies do), otherwise a new UUID; the relay forwards it to the agent
and the local app. The access log never holds a header value or a query string: a
token, cookie, Authorization value or provider signature cannot end up in it.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterable

from aiohttp import web

from .config import Network
from .connections import client_of
from .metrics import Metrics
from .relayed import STARTED, CountedResponse

access_log = logging.getLogger("relay.access")

#: Keys of the request-scoped values Ingress fills in (aiohttp's request mapping).
REQUEST_ID = web.RequestKey("relay.request_id", str)
ROUTE = web.RequestKey("relay.route", str)  # one of metrics.ROUTES
TUNNEL = web.RequestKey("relay.tunnel", str)  # the claimed tunnel's name, once its owner is known
#: The host name a TLS ask (``/_relay/tls-ask?domain=``) asked about, for the access log.
ASKED = web.RequestKey("relay.asked", str)

#: A client's X-Request-Id kept as it is: 1 to 128 URL-safe token characters.
_SANE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._~:+/=-]{1,128}")
#: Characters of the path written to the access log (beyond: cut, marked with an ellipsis).
MAX_LOGGED_PATH = 256
#: The status an answer gets in the log and the metrics when the client left before it.
CLIENT_CLOSED = 499  # nginx's "client closed request"


def body_bytes(response: web.StreamResponse) -> int:
    """Body bytes of ``response``: counted for a streamed one, the body's length for a
    ``web.Response`` (written after the middleware returns), 0 for anything else."""
    if isinstance(response, CountedResponse):
        return response.sent
    if isinstance(response, web.Response) and isinstance(response.body, bytes | bytearray):
        return len(response.body)
    return 0


def request_id(raw_headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The id of a request with ``raw_headers``: its one sane ``X-Request-Id``, or a new UUID4."""
    values = [value for name, value in raw_headers if name.lower() == b"x-request-id"]
    if len(values) == 1 and _SANE_REQUEST_ID.fullmatch(values[0]):
        return values[0].decode("ascii")
    return new_uuid4()


def new_uuid4() -> str:
    """A random UUID (RFC 9562 5.4: version 4, variant 10), as ``str(uuid.uuid4())`` gives
    it, in a third of its time (no ``UUID`` object: 0.8 against 2.2 us, one per request)."""
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


#: The variant nibble (RFC 9562 4.1: 0b10xx) for a random hex digit, keeping its two low bits.
_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def loggable_path(raw_path: str) -> str:
    """The path of a raw target (no query: it may carry a secret), printable ASCII only."""
    path = raw_path.split("?", 1)[0]
    cut = path[:MAX_LOGGED_PATH].encode("ascii", "backslashreplace").decode("ascii")
    cut = "".join(c if " " < c < "\x7f" else f"\\x{ord(c):02x}" for c in cut)
    return cut + ("..." if len(path) > MAX_LOGGED_PATH else "")


class RequestNotes:
    """Called by the application's middleware around every public request."""

    def __init__(self, *, metrics: Metrics, access_log: bool, trusted_proxies: tuple[Network, ...]) -> None:
        self.metrics = metrics
        self.log_access = access_log
        self.trusted_proxies = trusted_proxies

    def begin(self, request: web.Request) -> float:
        """Give ``request`` its id; returns the start time for ``end``."""
        request[REQUEST_ID] = request_id(request.raw_headers)
        return time.monotonic()

    def end(self, request: web.Request, response: web.StreamResponse | None, started: float) -> None:
        """Count the answered request. ``response`` None: the handler did not end (the
        client went away): what it had started to send (status, bytes so far) is counted
        then, ``CLIENT_CLOSED`` if nothing."""
        seconds = time.monotonic() - started
        if response is None:
            response = request.get(STARTED)
        status = CLIENT_CLOSED if response is None else response.status
        error = "" if response is None else response.headers.get("X-Relay-Error", "")
        read = request.content.total_bytes
        sent = 0 if response is None else body_bytes(response)
        tunnel = request.get(TUNNEL)
        route = request.get(ROUTE, "server")
        self.metrics.observe_request(
            route=route, status=status, error=error, tunnel=tunnel, seconds=seconds, read=read, sent=sent
        )
        if not self.log_access:
            return
        fields = {
            "request_id": request[REQUEST_ID],
            "client": client_of(request, self.trusted_proxies),
            "method": request.method,
            "tunnel": tunnel or "-",
            "path": loggable_path(request.raw_path),
            **({"asked": request[ASKED]} if ASKED in request else {}),
            "status": status,
            "error": error or "-",
            "bytes_in": read,
            "bytes_out": sent,
            "duration_ms": round(seconds * 1000, 1),
        }
        access_log.info(
            " ".join(f"{k}={v}" for k, v in fields.items()),
            extra={"fields": fields, "summary": f"{request.method} {fields['path']} {status}"},
        )
