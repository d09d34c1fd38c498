"""What the inspector's handlers share: the recorder, the tunnel, and what the agent knows."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from aiohttp import web

from relay_protocol import Welcome

from ..background import Background
from .recorder import Recorder
from .replay import LocalService


class Inspector:
    """The inspector of one agent: its ``recorder``, the ``service`` replays go to (the
    tunnel), and the names and URLs the server granted (updated at every WELCOME)."""

    def __init__(self, recorder: Recorder, service: LocalService) -> None:
        self.recorder = recorder
        self.service = service
        self.background = Background()
        config = service.config
        self.names: list[str] = list(config.names)
        self.urls: list[str] = []
        self.online = False

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
