"""``relay-server``: translates options into a ``ServerConfig`` or a store call; no logic here."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import ipaddress
import json
import os
import shlex
import socket
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import click

from relay_protocol import BUILD, RelayError
from relay_protocol.limits import HEARTBEAT_INTERVAL, MAX_HEARTBEAT_INTERVAL, MIN_HEARTBEAT_INTERVAL
from relay_web.options import Seconds, version_option

# Only what every command needs is imported here: aiohttp and the server's modules load
# when `serve` or `status` runs, so `relay-server token create` starts in a third of the time.
from . import tokens
from .config import (
    DEFAULT_HEAD_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_AGENTS_PER_USER,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
    DEFAULT_MAX_NAMES_PER_USER,
    DEFAULT_PORT,
    DEFAULT_TIMEOUT,
    MIN_ADMIN_TOKEN,
    Network,
    QueueConfig,
    ServerConfig,
    parse_listen,
)
from .durations import parse_duration
from .logs import configure_logging
from .names import default_patterns, is_valid_name, is_valid_pattern
from .retry import RetryPolicy, parse_schedule
from .store import Store
from .tls import server_context

if TYPE_CHECKING:
    from aiohttp import web

T = TypeVar("T")

DEFAULT_TOKEN_TTL = "30d"
#: Names ``token create`` lists when other users hold names in the new user's namespace.
TAKEN_SHOWN = 10
DEV_USER = "dev"

data_dir_option = click.option(
    "--data-dir",
    envvar="RELAY_DATA_DIR",
    default="relay-data",
    show_default=True,
    show_envvar=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory of the secret and the SQLite store.",
)


def _fail(exc: Exception) -> click.ClickException:
    return click.ClickException(str(exc))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@version_option(BUILD)
def main() -> None:
    """relay-server: the public side of relay, a self-hosted tunnel relay for webhooks."""


@main.command("serve")
@click.option(
    "--host",
    envvar="RELAY_HOST",
    default="127.0.0.1",
    show_envvar=True,
    help="Address to listen on (put a reverse proxy such as Caddy in front).",
)
@click.option(
    "--port",
    envvar="RELAY_PORT",
    default=DEFAULT_PORT,
    type=click.IntRange(0, 65535),
    show_envvar=True,
    help="Port to listen on.",
)
@data_dir_option
@click.option(
    "--public-url",
    envvar="RELAY_PUBLIC_URL",
    default=None,
    show_envvar=True,
    help="Scheme and domain of the URLs handed out; tunnels get NAME.<domain>."
    "  [default: http://localhost:PORT]",
)
@click.option(
    "--dev",
    envvar="RELAY_DEV",
    is_flag=True,
    show_envvar=True,
    help="Development mode: print a ready token and the agent command.",
)
@click.option(
    "--timeout",
    envvar="RELAY_TIMEOUT",
    default=DEFAULT_TIMEOUT,
    type=Seconds(min=0.1),
    show_envvar=True,
    help="Seconds to wait for the local service's response before 504.",
)
@click.option(
    "--idle-timeout",
    envvar="RELAY_IDLE_TIMEOUT",
    default=DEFAULT_IDLE_TIMEOUT,
    type=Seconds(min=0.1),
    show_envvar=True,
    help="Seconds a started response, websocket or event stream may stay silent before it is closed.",
)
@click.option(
    "--heartbeat-interval",
    envvar="RELAY_HEARTBEAT_INTERVAL",
    default=HEARTBEAT_INTERVAL,
    type=Seconds(min=MIN_HEARTBEAT_INTERVAL, max=MAX_HEARTBEAT_INTERVAL),
    show_envvar=True,
    help="Seconds between PINGs to each agent (5-60); one silent for three of them is dropped.",
)
@click.option(
    "--queue-max-body",
    envvar="RELAY_QUEUE_MAX_BODY",
    default=QueueConfig.max_body,
    type=click.IntRange(min=0),
    show_envvar=True,
    help="Bytes: in queue mode, larger bodies are forwarded live instead of stored.",
)
@click.option(
    "--quota-events",
    envvar="RELAY_QUOTA_EVENTS",
    default=QueueConfig.quota_events,
    type=click.IntRange(min=1),
    show_envvar=True,
    help="Per tunnel: events waiting for delivery before new ones get 429.",
)
@click.option(
    "--quota-bytes",
    envvar="RELAY_QUOTA_BYTES",
    default=QueueConfig.quota_bytes,
    type=click.IntRange(min=1),
    show_envvar=True,
    help="Per tunnel: body bytes waiting for delivery before new events get 429.",
)
@click.option(
    "--body-budget",
    envvar="RELAY_BODY_BUDGET",
    default=QueueConfig.body_budget,
    type=click.IntRange(min=1024 * 1024),
    show_envvar=True,
    help="Bytes of webhook bodies held in memory at once, server-wide; over it new webhooks get 503.",
)
@click.option(
    "--body-timeout",
    envvar="RELAY_BODY_TIMEOUT",
    default=QueueConfig.body_timeout,
    type=Seconds(min=0.1),
    show_envvar=True,
    help="Seconds a webhook's whole body may take to arrive; a slower sender gets 408.",
)
@click.option(
    "--retention",
    envvar="RELAY_RETENTION",
    default="7d",
    show_envvar=True,
    help="How long delivered and dead events are kept for inspection and replay.",
)
@click.option(
    "--retry-schedule",
    envvar="RELAY_RETRY_SCHEDULE",
    default="5s,30s,2m,10m,30m,1h,3h,6h,12h,24h",
    show_envvar=True,
    help="Delays before each retry of a failed delivery; after the last, the event is dead.",
)
@click.option(
    "--max-age",
    envvar="RELAY_MAX_AGE",
    default="3d",
    show_envvar=True,
    help="An event still undelivered this long after it arrived is dead.",
)
@click.option(
    "--allow-private-destinations",
    envvar="RELAY_ALLOW_PRIVATE_DESTINATIONS",
    is_flag=True,
    show_envvar=True,
    help="Let URL destinations reach loopback, private and link-local addresses.",
)
@click.option(
    "--store-max-bytes",
    envvar="RELAY_STORE_MAX_BYTES",
    default=None,
    type=click.IntRange(min=65536),
    show_envvar=True,
    help="Cap the store's size in bytes; when full, new events get 503.  [default: no cap]",
)
@click.option(
    "--trusted-proxy",
    "trusted_proxies",
    envvar="RELAY_TRUSTED_PROXY",
    multiple=True,
    show_envvar=True,
    help="CIDR of a front proxy whose X-Forwarded-* headers are believed (repeatable; "
    "the variable takes several, space-separated). From any other peer they are dropped.",
)
@click.option(
    "--max-connections",
    envvar="RELAY_MAX_CONNECTIONS",
    default=DEFAULT_MAX_CONNECTIONS,
    type=click.IntRange(min=1),
    show_envvar=True,
    help="Open connections at once, in total (kept below the file-descriptor limit); "
    "more are answered 503 and closed.",
)
@click.option(
    "--max-connections-per-client",
    envvar="RELAY_MAX_CONNECTIONS_PER_CLIENT",
    default=DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
    type=click.IntRange(min=1),
    show_envvar=True,
    help="Open connections at once from one client address (trusted proxies are not counted).",
)
@click.option(
    "--max-agents-per-user",
    envvar="RELAY_MAX_AGENTS_PER_USER",
    default=DEFAULT_MAX_AGENTS_PER_USER,
    type=click.IntRange(min=1),
    show_envvar=True,
    help="Agent connections one user may hold at once; more are closed with 4029 and try again later.",
)
@click.option(
    "--max-names-per-user",
    envvar="RELAY_MAX_NAMES_PER_USER",
    default=DEFAULT_MAX_NAMES_PER_USER,
    type=click.IntRange(min=1),
    show_envvar=True,
    help="Tunnel names one user may hold; claiming one more is refused (HELLO: 4003, API: 409).",
)
@click.option(
    "--head-timeout",
    envvar="RELAY_HEAD_TIMEOUT",
    default=DEFAULT_HEAD_TIMEOUT,
    type=Seconds(min=0.1),
    show_envvar=True,
    help="Seconds a connection may take to send a complete request head before it is closed.",
)
@click.option(
    "--tls-cert",
    envvar="RELAY_TLS_CERT",
    default=None,
    show_envvar=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="PEM certificate chain: serve HTTPS and WSS without a front proxy (with --tls-key).",
)
@click.option(
    "--tls-key",
    envvar="RELAY_TLS_KEY",
    default=None,
    show_envvar=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="PEM private key of --tls-cert.",
)
@click.option(
    "--metrics-listen",
    envvar="RELAY_METRICS_LISTEN",
    default=None,
    show_envvar=True,
    help="HOST:PORT of a second listener serving only /metrics (for a scraper off the box)."
    "  [default: /metrics on the apex, from loopback only]",
)
@click.option(
    "--metrics-per-tunnel",
    envvar="RELAY_METRICS_PER_TUNNEL",
    is_flag=True,
    show_envvar=True,
    help="Label request metrics with the tunnel name (one series per tunnel: mind the cardinality).",
)
@click.option(
    "--admin-token",
    envvar="RELAY_ADMIN_TOKEN",
    default=None,
    show_envvar=True,
    help="Secret that lets `relay-server status --admin-token` read the status from off the box"
    " (at least 32 characters).  [default: status from loopback only]",
)
@click.option(
    "--access-log",
    envvar="RELAY_ACCESS_LOG",
    is_flag=True,
    show_envvar=True,
    help="Log one line per public request (request id, tunnel, status, bytes, duration).",
)
@click.option(
    "--log-format",
    envvar="RELAY_LOG_FORMAT",
    default="text",
    show_envvar=True,
    type=click.Choice(["text", "json"]),
    help="Log lines as text, or as one JSON object each.",
)
@click.option(
    "--log-level",
    envvar="RELAY_LOG_LEVEL",
    default="info",
    show_envvar=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
    help="Log verbosity.",
)
def serve_command(
    host: str,
    port: int,
    data_dir: Path,
    public_url: str | None,
    dev: bool,
    timeout: float,
    idle_timeout: float,
    heartbeat_interval: float,
    queue_max_body: int,
    quota_events: int,
    quota_bytes: int,
    body_budget: int,
    body_timeout: float,
    retention: str,
    retry_schedule: str,
    max_age: str,
    allow_private_destinations: bool,
    store_max_bytes: int | None,
    trusted_proxies: tuple[str, ...],
    max_connections: int,
    max_connections_per_client: int,
    max_agents_per_user: int,
    max_names_per_user: int,
    head_timeout: float,
    tls_cert: Path | None,
    tls_key: Path | None,
    metrics_listen: str | None,
    metrics_per_tunnel: bool,
    admin_token: str | None,
    access_log: bool,
    log_format: str,
    log_level: str,
) -> None:
    """Run the relay server: public tunnel URLs and the agent endpoint."""
    configure_logging(log_level, log_format)
    tls = _tls(tls_cert, tls_key)
    scheme = "http" if tls is None else "https"
    default_url = public_url is None
    public_url = (public_url or f"{scheme}://localhost:{port}").rstrip("/")
    if tls is not None and not public_url.startswith("https://"):
        raise click.BadParameter(
            "the server serves HTTPS (--tls-cert): use an https:// URL", param_hint="--public-url"
        )
    if admin_token is not None and len(admin_token) < MIN_ADMIN_TOKEN:
        raise click.BadParameter(f"use at least {MIN_ADMIN_TOKEN} characters", param_hint="--admin-token")
    config = ServerConfig(
        host=host,
        port=port,
        data_dir=data_dir,
        public_url=public_url,
        dev=dev,
        timeout=timeout,
        idle_timeout=idle_timeout,
        heartbeat_interval=heartbeat_interval,
        queue=_queue_config(
            queue_max_body,
            quota_events,
            quota_bytes,
            retention,
            retry_schedule,
            max_age,
            allow_private_destinations,
            timeout,
        ),
        store_max_bytes=store_max_bytes,
        trusted_proxies=_networks(trusted_proxies),
        max_connections=max_connections,
        max_connections_per_client=max_connections_per_client,
        max_agents_per_user=max_agents_per_user,
        max_names_per_user=max_names_per_user,
        head_timeout=head_timeout,
        tls=tls,
        metrics_listen=_option(parse_listen, metrics_listen, "--metrics-listen") if metrics_listen else None,
        metrics_per_tunnel=metrics_per_tunnel,
        admin_token=admin_token,
        access_log=access_log,
    )
    config = replace(config, queue=replace(config.queue, body_budget=body_budget, body_timeout=body_timeout))
    from relay_web.listen import listening_sockets

    from .app import create_app

    sockets = []
    if port == 0:  # the kernel picks it: listen now, so that the URLs printed name it
        try:
            sockets = listening_sockets(host, 0)
        except OSError as exc:
            raise click.ClickException(f"cannot listen on {host}:0: {exc.strerror or exc}") from exc
        port = sockets[0].getsockname()[1]
        config = replace(
            config, port=port, public_url=f"{scheme}://localhost:{port}" if default_url else public_url
        )
    try:
        try:
            store = Store(config.data_dir, config.store_max_bytes)
            app = create_app(config, store)
            banner = _print_dev_banner(config, store) if dev else None
        except RelayError as exc:
            raise _fail(exc) from exc
        except OSError as exc:
            raise click.ClickException(f"cannot use data dir {data_dir}: {exc}") from exc
        try:
            with asyncio.Runner(loop_factory=_event_loop()) as runner:
                runner.run(_serve(config, app, banner, sockets))
        except RelayError as exc:  # --metrics-listen's port in use
            raise _fail(exc) from exc
        except OSError as exc:  # port in use, permission denied
            raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    finally:
        for sock in sockets:
            sock.close()  # the server has closed them, unless it never started


def _tls(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    """The TLS context of --tls-cert/--tls-key (both or neither); a usage error names the problem."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise click.UsageError("--tls-cert and --tls-key go together")
    try:
        return server_context(cert, key)
    except RelayError as exc:
        raise _fail(exc) from exc


def _queue_config(
    max_body: int,
    quota_events: int,
    quota_bytes: int,
    retention: str,
    schedule: str,
    max_age: str,
    allow_private: bool,
    timeout: float,
) -> QueueConfig:
    policy = RetryPolicy(
        _option(parse_schedule, schedule, "--retry-schedule"), _option(parse_duration, max_age, "--max-age")
    )
    kept = _option(parse_duration, retention, "--retention")
    return QueueConfig(max_body, quota_events, quota_bytes, kept, policy, timeout, allow_private)


def _option(parse: Callable[[str], T], text: str, option: str) -> T:
    """``parse(text)``; a ValueError becomes a usage error naming ``option``."""
    try:
        return parse(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from exc


async def _serve(
    config: ServerConfig,
    app: web.Application,
    banner: Callable[[], None] | None,
    sockets: list[socket.socket],
) -> None:
    """``serve`` (on ``sockets`` if any), printing ``banner`` once the port is bound
    (never for a port it could not bind)."""
    ready = asyncio.Event()
    from .app import serve

    serving = asyncio.create_task(serve(config, app, ready, sockets or None))
    bound = asyncio.create_task(ready.wait())
    await asyncio.wait({serving, bound}, return_when=asyncio.FIRST_COMPLETED)
    bound.cancel()
    if ready.is_set() and banner is not None:
        banner()
    await serving


#: The local service port the --dev banner suggests, and the one it suggests
#: instead when the relay itself listens on the first.
DEV_LOCAL_PORTS = (8080, 8081)


def _print_dev_banner(config: ServerConfig, store: Store) -> Callable[[], None]:
    """Issue the dev token now (a bad data dir fails before serving); the returned
    function prints the banner, called once the port is bound."""
    secret = tokens.load_secret(config.data_dir)
    token, claims = tokens.issue(
        secret, DEV_USER, default_patterns(DEV_USER), parse_duration(DEFAULT_TOKEN_TTL)
    )
    store.record_token(claims)
    # Never suggest forwarding to the relay's own port: requests would loop back into it.
    local_port = next(p for p in DEV_LOCAL_PORTS if p != config.port)
    moved = (
        "" if local_port == DEV_LOCAL_PORTS[0] else f" (not {DEV_LOCAL_PORTS[0]}: the relay listens there)"
    )
    command = shlex.join(
        [
            _agent_script(),
            "connect",
            "--server",
            config.public_url,
            "--token",
            token,
            "--forward",
            f"localhost:{local_port}",
        ]
    )

    def banner() -> None:
        click.echo(f"relay-server (dev) on {config.public_url}, data in {config.data_dir}/")
        click.echo(f"Token for user {DEV_USER!r} (expires in {DEFAULT_TOKEN_TTL}):\n\n  {token}\n")
        click.echo(
            f"Connect an agent to a local service on port {local_port}{moved}, in another shell:"
            f"\n\n  {command}\n"
        )
        click.echo(f"Then: curl {config.public_url}/t/{DEV_USER}/\n", nl=True)

    return banner


def _agent_script() -> str:
    """The relay-agent installed beside this relay-server (relative to here if below it)."""
    script = Path(sys.argv[0]).resolve().parent / "relay-agent"
    if not script.exists():
        return "relay-agent"
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


@main.command("status")
@click.option(
    "--server",
    envvar="RELAY_STATUS_SERVER",
    default=f"http://127.0.0.1:{DEFAULT_PORT}",
    show_envvar=True,
    help="The running server: its listening address on this host, or its public URL with --admin-token.",
)
@click.option(
    "--admin-token",
    envvar="RELAY_ADMIN_TOKEN",
    default=None,
    show_envvar=True,
    help="The server's --admin-token, to ask from off the box.",
)
@click.option(
    "--ca-file",
    envvar="RELAY_CA_FILE",
    default=None,
    show_envvar=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="PEM CA certificates to verify an https:// server with.  [default: the system's]",
)
@click.option("--json", "as_json", is_flag=True, help="Print the status document as JSON.")
def status_command(server: str, admin_token: str | None, ca_file: Path | None, as_json: bool) -> None:
    """Show a running server's connected agents and its tunnels' queues."""
    from . import status

    try:
        doc = status.fetch(server, admin_token, ca_file)
    except RelayError as exc:
        raise _fail(exc) from exc
    click.echo(json.dumps(doc, indent=2) if as_json else status.render(doc))


@main.group("token")
def token_group() -> None:
    """Create, list and revoke agent tokens."""


@token_group.command("create")
@click.argument("user")
@click.option(
    "--name",
    "names",
    multiple=True,
    envvar="RELAY_TOKEN_NAMES",
    show_envvar=True,
    help="Tunnel name or pattern (alice-*) the token may claim; repeatable.  [default: USER and USER-*]",
)
@click.option(
    "--expires",
    envvar="RELAY_TOKEN_EXPIRES",
    show_envvar=True,
    default=DEFAULT_TOKEN_TTL,
    help="Lifetime: 90s, 15m, 12h, 30d.",
)
@data_dir_option
def token_create(user: str, names: tuple[str, ...], expires: str, data_dir: Path) -> None:
    """Print a new token for USER on stdout (and nothing else)."""
    if not is_valid_name(user):
        raise click.BadParameter("must be a DNS label: a-z, 0-9 and '-'", param_hint="USER")
    bad = [n for n in names if not is_valid_pattern(n)]
    if bad:
        raise click.BadParameter(f"{bad[0]!r} is not a DNS label or pattern", param_hint="--name")
    try:
        ttl = parse_duration(expires)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--expires") from exc
    try:
        if not os.environ.get(tokens.SECRET_ENV) and not (data_dir / tokens.SECRET_FILE).exists():
            # stderr: stdout stays the token alone, for TOKEN=$(relay-server token create ...).
            where = data_dir / tokens.SECRET_FILE
            click.echo(f"relay-server: no signing secret in {data_dir}/: creating one in {where}", err=True)
        secret = tokens.load_secret(data_dir)
        token, claims = tokens.issue(secret, user, list(names) or default_patterns(user), ttl)
        store = Store(data_dir)
        store.record_token(claims)
        taken = store.taken_from(user)
        store.close()
    except (RelayError, OSError) as exc:
        raise _fail(exc) from exc
    if taken:  # stderr, as above
        shown = ", ".join(f"{r.name} ({r.user})" for r in taken[:TAKEN_SHOWN])
        more = f" and {len(taken) - TAKEN_SHOWN} more" if len(taken) > TAKEN_SHOWN else ""
        click.echo(
            f"relay-server: warning: other users claimed names in {user!r}'s namespace before it"
            f" existed: {shown}{more}; `relay-server names release NAME` frees one",
            err=True,
        )
    click.echo(token)


def _when(stamp: float | None) -> str:
    return "-" if stamp is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp))


@token_group.command("list")
@data_dir_option
def token_list(data_dir: Path) -> None:
    """List tokens (ids, users, names, expiry); never the tokens themselves."""
    try:
        records = Store(data_dir).list_tokens()
    except RelayError as exc:
        raise _fail(exc) from exc
    now = time.time()
    click.echo(f"{'ID':32}  {'USER':16}  {'NAMES':24}  {'EXPIRES':16}  STATUS")
    for r in records:
        status = "revoked" if r.revoked_at else ("expired" if r.expires_at < now else "active")
        click.echo(
            f"{r.token_id:32}  {r.user:16}  {','.join(r.names):24}  {_when(r.expires_at):16}  {status}"
        )


@token_group.command("revoke")
@click.argument("token_id")
@data_dir_option
def token_revoke(token_id: str, data_dir: Path) -> None:
    """Revoke a token by its id (from `token list`): agents using it are refused, those
    connected with it are disconnected within seconds, and the API answers it 401."""
    try:
        revoked = Store(data_dir).revoke_token(token_id)
    except RelayError as exc:
        raise _fail(exc) from exc
    if not revoked:
        raise click.ClickException(f"no active token has the id {token_id!r}")
    click.echo(f"revoked {token_id}; a running server disconnects its agents within seconds", err=True)


@main.group("names")
def names_group() -> None:
    """List claimed tunnel names, or free one (admin)."""


@names_group.command("list")
@data_dir_option
def names_list(data_dir: Path) -> None:
    """List claimed names and their owners."""
    try:
        records = Store(data_dir).list_names()
    except RelayError as exc:
        raise _fail(exc) from exc
    click.echo(f"{'NAME':32}  {'USER':16}  CLAIMED")
    for r in records:
        click.echo(f"{r.name:32}  {r.user:16}  {_when(r.claimed_at)}")


@names_group.command("release")
@click.argument("name")
@click.option("--yes", "-y", is_flag=True, help="Release without asking (needed when not on a terminal).")
@data_dir_option
def names_release(name: str, yes: bool, data_dir: Path) -> None:
    """Free NAME so that any user may claim it again.

    Nothing of its owner passes to the next one: the tunnel's settings and destinations
    are removed, its waiting events die ("name released": their owner can still read
    them, and replay them only if the name is theirs again), and a running server closes
    the owner's agents on the name within seconds. Says how many events will die and
    asks first.
    """
    try:
        store = Store(data_dir)
        owner = store.name_owner(name)
        waiting = store.waiting_events(name) if owner is not None else 0
    except RelayError as exc:
        raise _fail(exc) from exc
    if owner is None:
        raise click.ClickException(f"nobody holds the name {name!r}")
    effects = (
        f'{_events(waiting)} waiting for delivery would be dead ("name released"), its settings'
        " and destinations removed, its agents disconnected"
    )
    if not yes:
        if not _interactive():
            raise click.ClickException(f"not releasing {name!r} (held by {owner}) without --yes: {effects}")
        click.echo(f"releasing {name!r} (held by {owner}): {effects}", err=True)
        if not click.confirm("Release it?", err=True):
            raise click.ClickException(f"{name!r} not released")
    try:
        released = store.release(name)
    except RelayError as exc:
        raise _fail(exc) from exc
    if released is None:
        raise click.ClickException(f"nobody holds the name {name!r}")
    click.echo(
        f"released {name} (held by {released.owner}): {_events(released.events)} dead"
        f"{', settings removed' if released.settings else ''}",
        err=True,
    )


def _events(count: int) -> str:
    return f"{count} event{'' if count == 1 else 's'}"


def _interactive() -> bool:
    """True if a person can answer a question on this terminal."""
    return sys.stdin.isatty()


def _networks(values: tuple[str, ...]) -> tuple[Network, ...]:
    """``--trusted-proxy`` values as networks; a usage error names a bad one."""
    networks = []
    for value in (item for text in values for item in text.split()):
        try:
            networks.append(ipaddress.ip_network(value, strict=False))
        except ValueError as exc:
            raise click.BadParameter(
                f"{value!r} is not an IP address or CIDR", param_hint="--trusted-proxy"
            ) from exc
    return tuple(networks)


def _event_loop() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop where it installs (a tenth of the agent's CPU per request,
    bench/), else asyncio's own; ``RELAY_EVENT_LOOP=asyncio`` picks asyncio's anyway."""
    if os.environ.get("RELAY_EVENT_LOOP") == "asyncio" or importlib.util.find_spec("uvloop") is None:
        return None
    return importlib.import_module("uvloop").new_event_loop  # type: ignore[no-any-return]
