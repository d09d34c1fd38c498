"""A small client of the server's JSON API (``/_relay/api/``), for the CLI.

The standard library's ``urllib`` is enough for one request per command, and keeps the
``tunnel`` and ``events`` commands quick to start (no asyncio, no aiohttp to import).
Like the agent's own connection it ignores proxy settings in the environment.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

from relay_protocol import RelayError

from .errors import AgentConfigError
from .tls import certificate_problem

#: Seconds an API call may take.
API_TIMEOUT = 30.0

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ApiError(RelayError):
    """The server refused an API call (``status``: its HTTP status), or could not be
    reached (``status`` None); the message is the explanation."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def call(
    server: str,
    token: str,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    tls: ssl.SSLContext | None = None,
) -> Any:
    """One API call; returns the decoded JSON answer. Raises ``ApiError``.

    ``tls`` verifies an https:// server (``tls.client_context``; default: the system's CAs)."""
    if not server.startswith(("http://", "https://")):
        raise AgentConfigError(f"server URL {server!r} must start with http:// or https://")
    url = server.rstrip("/") + "/_relay/api/" + path
    headers = {"Authorization": f"Bearer {token}"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        opener = _OPENER if tls is None else _opener(tls)
        with opener.open(request, timeout=API_TIMEOUT) as response:
            return _decode(response.read())
    except urllib.error.HTTPError as exc:
        text = exc.read().decode("utf-8", "replace")
        answer = _decode(text.encode())
        message = answer.get("message") if isinstance(answer, dict) else text.strip()
        raise ApiError(f"{exc.code}: {message}", exc.code) from exc
    except TimeoutError as exc:
        raise ApiError(f"no answer from {url} within {API_TIMEOUT:g}s") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        host = urlsplit(url).hostname or url
        problem = certificate_problem(reason, host) if isinstance(reason, BaseException) else None
        raise ApiError(str(problem) if problem else f"cannot reach {url}: {reason}") from exc


def _opener(tls: ssl.SSLContext) -> urllib.request.OpenerDirector:
    handlers = (urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=tls))
    return urllib.request.build_opener(*handlers)


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None
