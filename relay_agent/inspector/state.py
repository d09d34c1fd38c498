"""What the inspector's handlers share: the recorder, the tunnel, and what the agent knows."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from typing import Any, TypeVar

from aiohttp import web

from relay_protocol import Welcome

from ..background import Background
from .recorder import Recorder
from .replay import LocalService

T = TypeVar("T")

#: Threads that render bodies for the page: one. A body is rendered in linear time, but a
#: megabyte of JSON takes a quarter second; pages asking for many at once wait their
#: turn here instead of filling the loop's default pool (the history's network calls).
RENDER_THREADS = 1


class Inspector:
    """The inspector of one agent: its ``recorder``, the ``service`` replays go to (the
    tunnel), and the names and URLs the server granted (updated at every WELCOME)."""

    def __init__(self, recorder: Recorder, service: LocalService) -> None:
        self.recorder = recorder
        self.service = service
        self.background = Background()
        self.renderer = ThreadPoolExecutor(RENDER_THREADS, thread_name_prefix="inspector-render")
        config = service.config
        self.names: list[str] = list(config.names)
        self.urls: list[str] = []
        self.online = False

    async def render(self, function: Callable[[T], str], argument: T) -> str:
        """``function(argument)`` (a body's rendering, as JSON text) in the render thread."""
        return await asyncio.get_running_loop().run_in_executor(self.renderer, function, argument)

    def welcome(self, welcome: Welcome) -> None:
        """The server (re)accepted the agent: its tunnels' names and URLs."""
        self.names = [str(t["name"]) for t in welcome.tunnels if "name" in t] or self.names
        self.urls = [str(url) for t in welcome.tunnels for url in t.get("urls", [])]
        self.online = True

    def offline(self, why: str, delay: float) -> None:
        self.online = False

    def status(self) -> dict[str, Any]:
        """``GET /api/status``: never the token."""
        config = self.service.config
        return {
            "server": config.server,
            "target": config.target.base_url,
            "names": self.names,
            "urls": self.urls,
            "online": self.online,
        }


INSPECTOR = web.AppKey("inspector", Inspector)


def error_code(status: int) -> str:
    """The API's error code for an HTTP status: its reason phrase as hyphenated lower-case
    words (``not-found``), but ``body-too-large`` for 413 as the relay server says it."""
    if status == 413:
        return "body-too-large"
    return HTTPStatus(status).phrase.lower().replace(" ", "-")


def api_error(status: int, code: str, message: str) -> web.Response:
    """The inspector API's error answer: ``{"error": CODE, "message": TEXT}``."""
    return web.json_response({"error": code, "message": message}, status=status)
