"""The errors a public client can see: a status, a short body, and ``X-Relay-Error``.

The header names the error so a client (or a test) can tell a relay error from
the local service's own response with the same status.
"""

from __future__ import annotations

from aiohttp import web

#: X-Relay-Error value -> HTTP status. docs and README list the same table.
STATUS = {
    "bad-request": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not-found": 404,
    "unknown-tunnel": 404,
    "method-not-allowed": 405,
    "body-timeout": 408,
    "conflict": 409,
    "body-too-large": 413,
    "uri-too-long": 414,
    "too-many-requests": 429,
    "headers-too-large": 431,
    "internal-error": 500,
    "unsupported-transfer-coding": 501,
    "local-unreachable": 502,
    "local-bad-response": 502,
    "tunnel-offline": 503,
    "too-many-connections": 503,
    "store-unavailable": 503,
    "server-busy": 503,
    "not-ready": 503,
    "local-timeout": 504,
}


def relay_error(code: str, message: str, **headers: str) -> web.Response:
    """A response for the relay error ``code`` (a key of ``STATUS``) explaining ``message``."""
    response = web.Response(status=STATUS[code], text=message + "\n", content_type="text/plain")
    response.headers["X-Relay-Error"] = code
    response.headers.update(headers)
    return response
