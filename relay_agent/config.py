"""The agent's configuration object, and the login file ``relay-agent login`` writes."""

from __future__ import annotations

import json
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import jwt

from relay_protocol.limits import HEARTBEAT_INTERVAL

from .errors import AgentConfigError
from .target import Target

DEFAULT_SERVER = "http://localhost:8000"


@dataclass(frozen=True)
class AgentConfig:
    server: str
    token: str
    target: Target
    names: tuple[str, ...] = ()
    host_header: str = "rewrite"  # "rewrite", "preserve", or a literal value
    #: Tunnel settings to store on the server (mode, max_concurrency); empty: keep them.
    settings: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    #: Verifies an https:// server (``tls.client_context``); plain http:// ignores it.
    tls: ssl.SSLContext = field(default_factory=ssl.create_default_context)
    #: Checks an https:// target's certificate (``tls.forward_context``); False: not checked.
    forward_tls: ssl.SSLContext | bool = False
    #: Seconds between PINGs to the server (``--heartbeat-interval``); a server silent,
    #: or not reading, for three of them is left and connected to again.
    heartbeat_interval: float = HEARTBEAT_INTERVAL

    @property
    def agent_url(self) -> str:
        """The websocket URL of the server's agent endpoint."""
        server = self.server.rstrip("/")
        if server.startswith("https://"):
            return "wss://" + server[len("https://") :] + "/_relay/agent"
        if server.startswith("http://"):
            return "ws://" + server[len("http://") :] + "/_relay/agent"
        raise AgentConfigError(f"server URL {self.server!r} must start with http:// or https://")


def login_file() -> Path:
    """Where ``login`` saves the server and token (the user's config dir)."""
    return Path(click.get_app_dir("relay")) / "agent.json"


def save_login(server: str, token: str) -> Path:
    path = login_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"server": server, "token": token}, f)
    os.chmod(path, 0o600)
    return path


def load_login() -> dict[str, str]:
    """The saved login, or {} if there is none."""
    try:
        data = json.loads(login_file().read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise AgentConfigError(f"cannot read {login_file()}: {exc}; run relay-agent login again") from exc
    return {k: v for k, v in data.items() if isinstance(v, str)} if isinstance(data, dict) else {}


def token_user(token: str) -> str:
    """The user a token names (its ``sub``), read without checking the signature:
    only the server can check it, and it will."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError as exc:
        raise AgentConfigError("this is not a relay token (not a JWT)") from exc
    user = claims.get("sub")
    if not isinstance(user, str):
        raise AgentConfigError("the token names no user")
    return user
