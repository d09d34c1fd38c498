"""A small client of the server's JSON API (``/_relay/api/``), for the CLI."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from relay_protocol import RelayError

from .errors import AgentConfigError

#: Seconds an API call may take.
API_TIMEOUT = 30.0


class ApiError(RelayError):
    """The server refused an API call; the message is its explanation."""


def call(server: str, token: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """One API call; returns the decoded JSON answer. Raises ``ApiError``."""
    if not server.startswith(("http://", "https://")):
        raise AgentConfigError(f"server URL {server!r} must start with http:// or https://")
    return asyncio.run(_call(server.rstrip("/") + "/_relay/api/" + path, token, method, body))


async def _call(url: str, token: str, method: str, body: dict[str, Any] | None) -> Any:
    timeout = aiohttp.ClientTimeout(total=API_TIMEOUT)
    headers = {"Authorization": f"Bearer {token}"}
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.request(method, url, headers=headers, json=body) as response,
        ):
            text = await response.text()
            try:
                data = json.loads(text)
            except ValueError:
                data = None
            if response.status >= 400:
                message = data.get("message") if isinstance(data, dict) else text.strip()
                raise ApiError(f"{response.status}: {message}")
            return data
    except aiohttp.ClientError as exc:
        raise ApiError(f"cannot reach {url}: {exc}") from exc
    except TimeoutError as exc:
        raise ApiError(f"no answer from {url} within {API_TIMEOUT:g}s") from exc
