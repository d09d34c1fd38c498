"""The server's configuration: one frozen object the CLI builds and ``run`` takes, and
the defaults its options show. Light on purpose (no aiohttp): ``relay-server token``
and the other commands that never serve import it, and start in a fraction of the time."""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from relay_protocol.limits import HEARTBEAT_INTERVAL

from .retry import RetryPolicy

#: Seconds a connection may take to send a complete request head (from its opening, or,
#: on a kept-alive connection, from the end of the previous response). Far above what a
#: real client needs on any network (one round trip), low enough that a slow-loris
#: client pins a descriptor for seconds, not the hour of aiohttp's keep-alive default.
DEFAULT_HEAD_TIMEOUT = 10.0
#: Seconds an idle kept-alive connection stays open between requests: above the idle
#: time of common clients (aiohttp's 15 s), so a client never reuses a connection the
#: relay is closing; nginx's default. Once the next head starts, DEFAULT_HEAD_TIMEOUT applies.
DEFAULT_KEEPALIVE_TIMEOUT = 75.0
#: Connections open at once, in total (further ones are answered 503 and closed). Also
#: held below the process's file-descriptor limit by ``FD_RESERVE``.
DEFAULT_MAX_CONNECTIONS = 10_000
#: Connections open at once from one client address: far above a browser (6) or a
#: provider's burst, and the load tests (200 at once), far below the total, so one
#: address cannot take the server. Peers in ``--trusted-proxy`` are not counted.
DEFAULT_MAX_CONNECTIONS_PER_CLIENT = 512
#: Agent connections one user may hold at once, counted from authentication on: a fleet
#: of a hundred hosts, at some 20 KB each when idle. Without a cap one token holder could
#: open DEFAULT_MAX_CONNECTIONS_PER_CLIENT from each address it has. ngrok caps agent
#: sessions per account the same way.
DEFAULT_MAX_AGENTS_PER_USER = 100
#: Tunnel names one user may hold. Each is a row (and its settings) kept until an admin
#: releases it, and the tunnels API claims one per call: without a cap one token could fill
#: the store with names. A fleet of one name per host raises it with the agents' cap (the
#: bench's 10,000 agents of one user do). ngrok counts reserved domains per account.
DEFAULT_MAX_NAMES_PER_USER = 1000
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

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
class QueueConfig:
    #: Largest body that becomes an event; larger requests stay live (10 MiB).
    max_body: int = 10 * 1024 * 1024
    #: Per tunnel: most events, and most body bytes, waiting for delivery.
    quota_events: int = 100_000
    quota_bytes: int = 1024 * 1024 * 1024
    #: Seconds finished (delivered or dead) events are kept for inspection and replay.
    retention: float = 7 * 86400.0
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    #: Seconds an attempt may take up to the destination's response head.
    timeout: float = 30.0
    #: URL destinations may resolve to loopback, private or link-local addresses.
    allow_private: bool = False
    #: Server-wide bytes of webhook bodies held in memory at once (being read, stored,
    #: tried inline): 256 MiB is 25 bodies of the largest size, what a small VPS can spare.
    #: Over it, a new webhook gets 503 server-busy (Retry-After) before any byte is read.
    body_budget: int = 256 * 1024 * 1024
    #: Seconds a webhook's whole body may take to arrive (10 MiB in 60 s is 170 KB/s):
    #: a slower sender is cut with 408 and nothing of it is stored.
    body_timeout: float = 60.0


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
    #: Seconds between PINGs to each agent (``--heartbeat-interval``); an agent silent,
    #: or not reading, for three of them is dropped.
    heartbeat_interval: float = HEARTBEAT_INTERVAL
    queue: QueueConfig = field(default_factory=QueueConfig)
    #: Cap on the store's size (bytes); None: the disk is the limit.
    store_max_bytes: int | None = None
    #: Front proxies whose X-Forwarded-* are believed (``--trusted-proxy``).
    trusted_proxies: tuple[Network, ...] = ()
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_connections_per_client: int = DEFAULT_MAX_CONNECTIONS_PER_CLIENT
    #: Agent connections one user may hold at once (``--max-agents-per-user``).
    max_agents_per_user: int = DEFAULT_MAX_AGENTS_PER_USER
    #: Tunnel names one user may hold (``--max-names-per-user``).
    max_names_per_user: int = DEFAULT_MAX_NAMES_PER_USER
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
    if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT (such as 127.0.0.1:9100)")
    return host, int(port)
