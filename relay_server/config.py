"""The server's configuration: one frozen object the CLI builds and ``run`` takes."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path

from .connections import (
    DEFAULT_HEAD_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
    Network,
)
from .delivery import QueueConfig

DEFAULT_PORT = 8000
#: Seconds the server waits for the local service's response head before a 504.
DEFAULT_TIMEOUT = 30.0
#: Seconds a stream may carry nothing once its response started (a stalled
#: download, a silent websocket or event stream) before the relay closes it.
DEFAULT_IDLE_TIMEOUT = 300.0
#: Seconds SIGTERM waits for in-flight requests before closing agent connections.
DEFAULT_SHUTDOWN_GRACE = 10.0
#: Shortest --admin-token: 32 characters is 192 bits of base64 (``openssl rand -base64 24``),
#: beyond guessing over the network.
MIN_ADMIN_TOKEN = 32


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    data_dir: Path = Path("relay-data")
    public_url: str = f"http://localhost:{DEFAULT_PORT}"
    dev: bool = False
    timeout: float = DEFAULT_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE
    queue: QueueConfig = field(default_factory=QueueConfig)
    #: Cap on the store's size (bytes); None: the disk is the limit.
    store_max_bytes: int | None = None
    #: Front proxies whose X-Forwarded-* are believed (``--trusted-proxy``).
    trusted_proxies: tuple[Network, ...] = ()
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_connections_per_client: int = DEFAULT_MAX_CONNECTIONS_PER_CLIENT
    head_timeout: float = DEFAULT_HEAD_TIMEOUT
    #: Serve HTTPS and WSS itself (``--tls-cert``/``--tls-key``); None: plain HTTP.
    tls: ssl.SSLContext | None = None
    #: A second listener for /metrics alone (``--metrics-listen``), as (host, port).
    metrics_listen: tuple[str, int] | None = None
    #: Label request metrics by tunnel (``--metrics-per-tunnel``): a series per tunnel.
    metrics_per_tunnel: bool = False
    #: Lets the status endpoint answer off the box, to ``Authorization: Bearer <it>``.
    admin_token: str | None = None
    #: One log line per public request (``--access-log``).
    access_log: bool = False


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9100`` for IPv6) as (host, port); ValueError names the problem."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT (such as 127.0.0.1:9100)")
    return host, int(port)
