"""The server's configuration: one frozen object the CLI builds and ``run`` takes."""

from __future__ import annotations

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
