"""``relay-agent``: translates options into an ``AgentConfig`` and runs the tunnel; no logic here."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import importlib.util
import json
import logging
import os
import shlex
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import click
import jwt

from relay_protocol import BUILD, RelayError, RequestHead, Welcome
from relay_protocol.limits import HEARTBEAT_INTERVAL, MAX_HEARTBEAT_INTERVAL, MIN_HEARTBEAT_INTERVAL
from relay_web.options import Seconds, version_option

from . import api_client
from .config import DEFAULT_SERVER, AgentConfig, load_login, save_login, token_user
from .errors import AgentConfigError, InvalidTarget, Refused
from .inspector.address import InspectAddress, default_address, parse_address

if TYPE_CHECKING:
    from .console import Console
    from .inspector.state import Inspector
from .target import Target, parse_target, tls_name
from .tls import CertificateRefused, client_context, forward_context


class TargetType(click.ParamType[Target]):
    """``--forward``: a local service, checked before anything starts (usage error, exit 2)."""

    name = "[HOST:]PORT|URL"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Target:
        if isinstance(value, Target):
            return value
        try:
            return parse_target(str(value))
        except InvalidTarget as exc:
            self.fail(f"{value!r}: {exc.why}", param, ctx)


class ConcurrencyType(click.ParamType[int | str]):
    """``--max-concurrency``: ``auto`` (the relay adapts it, 8 to 64) or a number of
    deliveries, 1 to 256 (checked here, and by the server: relay_server.settings)."""

    name = "auto|1-256"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | str:
        text = str(value).strip()
        if text.lower() == "auto":  # the help shows AUTO (click's metavar is upper case)
            return "auto"
        if not (text.isascii() and text.isdigit()):  # int() would take "1_0" and other digits
            self.fail(f"{value!r} is not auto or a number", param, ctx)
        number = int(text)
        if not 1 <= number <= 256:
            self.fail(f"{number} is not between 1 and 256", param, ctx)
        return number


ca_file_option = click.option(
    "--ca-file",
    envvar="RELAY_CA_FILE",
    default=None,
    show_envvar=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="PEM CA certificates to verify an https:// server with (a private CA); there is no"
    " insecure mode.  [default: the system's CAs]",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@version_option(BUILD)
def main() -> None:
    """relay-agent: receive your relay server's requests on a local service."""


@main.command("connect")
@click.option(
    "--forward",
    "target",
    envvar="RELAY_FORWARD",
    type=TargetType(),
    required=True,
    show_envvar=True,
    help="Local service: PORT, HOST:PORT or http(s)://HOST:PORT.",
)
@click.option(
    "--server",
    envvar="RELAY_SERVER",
    default=None,
    show_envvar=True,
    help=f"Relay server URL.  [default: saved login, else {DEFAULT_SERVER}]",
)
@click.option(
    "--token",
    envvar="RELAY_TOKEN",
    default=None,
    show_envvar=True,
    help="Agent token from `relay-server token create`.  [default: saved login]",
)
@click.option(
    "--name",
    "names",
    envvar="RELAY_NAME",
    multiple=True,
    show_envvar=True,
    help="Tunnel name; repeatable.  [default: the token's user]",
)
@click.option(
    "--host-header",
    envvar="RELAY_HOST_HEADER",
    default="rewrite",
    show_envvar=True,
    help="Host header sent to the local service: rewrite (to the target), preserve, or a value.",
)
@click.option(
    "--mode",
    envvar="RELAY_MODE",
    type=click.Choice(["queue", "live"]),
    default=None,
    show_envvar=True,
    help="queue: webhooks are stored and retried while this agent or the app is down;"
    " live: a pure tunnel.  Stored on the server.  [default: keep the tunnel's setting (queue)]",
)
@click.option(
    "--max-concurrency",
    envvar="RELAY_MAX_CONCURRENCY",
    type=ConcurrencyType(),
    default=None,
    show_envvar=True,
    help="Queued deliveries in flight to the local service at once: a number, or auto (8 to 64,"
    " more while the app answers as fast).  [default: keep the setting (auto)]",
)
@click.option(
    "--label",
    envvar="RELAY_LABEL",
    default=socket.gethostname(),
    show_envvar=True,
    help="This agent's label: fan-out destinations agent:LABEL pick agents by it.",
)
@ca_file_option
@click.option(
    "--forward-ca",
    envvar="RELAY_FORWARD_CA",
    default=None,
    show_envvar=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="PEM CA certificates to verify an https:// local service with (mkcert's, a dev CA).",
)
@click.option(
    "--forward-verify",
    envvar="RELAY_FORWARD_VERIFY",
    is_flag=True,
    show_envvar=True,
    help="Verify an https:// local service against the system's CAs.  [default: an https://"
    " local service's certificate is not checked: it is your own machine]",
)
@click.option(
    "--inspect",
    "inspect_at",
    envvar="RELAY_INSPECT",
    default=None,
    show_envvar=True,
    metavar="ADDR",
    help="Serve the inspector (every request, replay, the server's history) on PORT or"
    " HOST:PORT; an address other than loopback opens it to that network.  [default:"
    " 127.0.0.1:4040, or the next free port]",
)
@click.option(
    "--no-inspect",
    envvar="RELAY_NO_INSPECT",
    is_flag=True,
    show_envvar=True,
    help="No inspector, and nothing recorded (wins over --inspect).",
)
@click.option(
    "--heartbeat-interval",
    envvar="RELAY_HEARTBEAT_INTERVAL",
    default=HEARTBEAT_INTERVAL,
    type=Seconds(min=MIN_HEARTBEAT_INTERVAL, max=MAX_HEARTBEAT_INTERVAL),
    show_envvar=True,
    help="Seconds between PINGs to the server (5-60); after three of them without a word from"
    " it, the agent connects again.",
)
@click.option(
    "--log-level",
    envvar="RELAY_LOG_LEVEL",
    default="warning",
    show_envvar=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
    help="Log verbosity (stderr).",
)
def connect_command(
    target: Target,
    server: str | None,
    token: str | None,
    names: tuple[str, ...],
    host_header: str,
    mode: str | None,
    max_concurrency: int | str | None,
    label: str,
    ca_file: Path | None,
    forward_ca: Path | None,
    forward_verify: bool,
    inspect_at: str | None,
    no_inspect: bool,
    heartbeat_interval: float,
    log_level: str,
) -> None:
    """Connect to the relay server and forward its requests to a local service."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        saved = load_login()
    except RelayError as exc:
        raise click.ClickException(str(exc)) from exc
    token = token or saved.get("token")
    if not token:
        raise click.ClickException("no token: pass --token, set RELAY_TOKEN, or run relay-agent login")
    tls = _tls(ca_file)
    if forward_ca is not None and forward_verify:
        raise click.UsageError("give --forward-ca (a CA file) or --forward-verify (the system CAs), not both")
    if target.scheme == "https" and host_header not in ("rewrite", "preserve"):
        try:
            tls_name(host_header)  # the TLS server name follows it
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--host-header") from exc
    try:
        forward_tls = forward_context(forward_ca, forward_verify)
    except RelayError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        inspect = None if no_inspect else parse_address(inspect_at) if inspect_at else default_address()
    except AgentConfigError as exc:
        raise click.BadParameter(str(exc).removeprefix("invalid --inspect "), param_hint="--inspect") from exc
    settings = {k: v for k, v in (("mode", mode), ("max_concurrency", max_concurrency)) if v is not None}
    config = AgentConfig(
        server=(server or saved.get("server") or DEFAULT_SERVER).rstrip("/"),
        token=token,
        target=target,
        # Without --name the tunnel is named after the token's user (its "sub").
        names=names or ((token_user(token),) if settings else ()),
        host_header=host_header,
        settings=settings,
        label=label,
        tls=tls,
        forward_tls=forward_tls,
        heartbeat_interval=heartbeat_interval,
    )
    try:
        config.agent_url  # noqa: B018 - validates the server URL before connecting
    except RelayError as exc:
        raise click.ClickException(str(exc)) from exc
    if target.scheme == "https" and forward_tls is False:
        click.echo(
            f"relay-agent: the certificate of {target.base_url} is not verified (your own machine;"
            " --forward-ca FILE or --forward-verify to verify it)",
            err=True,
        )
    try:
        with asyncio.Runner(loop_factory=_event_loop()) as runner:
            runner.run(_run(config, inspect))
    except AgentConfigError as exc:  # the inspector's address cannot be bound
        click.echo(f"relay-agent: {exc}", err=True)
        sys.exit(1)
    except Refused as exc:
        click.echo(f"relay-agent: the server refused this agent: {exc.reason}", err=True)
        sys.exit(1)
    except CertificateRefused as exc:
        click.echo(f"relay-agent: {exc}", err=True)
        sys.exit(1)


def _tls(ca_file: Path | None) -> ssl.SSLContext:
    try:
        return client_context(ca_file)
    except RelayError as exc:
        raise click.ClickException(str(exc)) from exc


async def _run(config: AgentConfig, inspect: InspectAddress | None) -> None:
    """Run the tunnel, with the inspector at ``inspect`` (None: no inspector, nothing
    recorded) and the console, until cancelled (SIGTERM, SIGINT) or refused."""
    # Imported here: the other commands (events, tunnel, login) need none of the
    # tunnel's machinery, and start faster without it.
    from .console import console_for
    from .inspector.app import serve
    from .inspector.recorder import Recorder
    from .inspector.state import Inspector
    from .tunnel import Tunnel

    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    recorder = Recorder() if inspect is not None else None
    watchers = _Watchers()
    tunnel = Tunnel(
        config, watchers.welcome, watchers.request, recorder=recorder, on_offline=watchers.offline
    )
    with contextlib.suppress(asyncio.CancelledError):
        async with contextlib.AsyncExitStack() as stack:
            bound = None
            if recorder is not None and inspect is not None:
                inspector = Inspector(recorder, tunnel)
                bound = await stack.enter_async_context(serve(inspector, inspect))
                if bound is None:
                    tunnel.recorder = None  # every default port is taken: no inspector, nothing recorded
                else:
                    watchers.inspector = inspector
            console = console_for(sys.stdout, config, bound.url if bound is not None else None)
            console.start()
            stack.push_async_callback(console.stop)
            watchers.console = console
            await tunnel.run()


class _Watchers:
    """Who is told what the tunnel does: the inspector (if it serves) and the console."""

    def __init__(self) -> None:
        self.inspector: Inspector | None = None
        self.console: Console | None = None

    def welcome(self, welcome: Welcome) -> None:
        for watcher in (self.inspector, self.console):
            if watcher is not None:
                watcher.welcome(welcome)

    def offline(self, why: str, delay: float) -> None:
        for watcher in (self.inspector, self.console):
            if watcher is not None:
                watcher.offline(why, delay)

    def request(self, head: RequestHead, status: int | str, seconds: float, error: str) -> None:
        if self.console is not None:
            self.console.request(head, status, seconds, error)


@main.command("login")
@click.option("--server", envvar="RELAY_SERVER", required=True, show_envvar=True, help="Relay server URL.")
@click.option("--token", envvar="RELAY_TOKEN", required=True, show_envvar=True, help="Agent token.")
def login_command(server: str, token: str) -> None:
    """Save the server and token, so that `connect` needs neither."""
    if not server.startswith(("http://", "https://")):
        raise click.BadParameter("must start with http:// or https://", param_hint="--server")
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError as exc:
        raise click.BadParameter("this is not a relay token (not a JWT)", param_hint="--token") from exc
    path = save_login(server.rstrip("/"), token)
    expires = claims.get("exp")
    when = time.strftime("%Y-%m-%d", time.localtime(expires)) if isinstance(expires, int) else "never"
    click.echo(f"Logged in to {server} as {claims.get('sub', '?')} (token expires {when}); saved to {path}")


# -- the server's API: tunnel settings and events ----------------------------------------


def api_options(command: Callable[..., None]) -> Callable[..., None]:
    """--server, --token (defaulting to the saved login) and --ca-file, for commands that
    call the API. The command receives ``ca_file`` through the click context: see ``_api``."""
    command = _take_ca_file(command)
    command = click.option(
        "--token",
        envvar="RELAY_TOKEN",
        default=None,
        show_envvar=True,
        help="Agent token.  [default: saved login]",
    )(command)
    return click.option(
        "--server",
        envvar="RELAY_SERVER",
        default=None,
        show_envvar=True,
        help=f"Relay server URL.  [default: saved login, else {DEFAULT_SERVER}]",
    )(command)


def _take_ca_file(command: Callable[..., None]) -> Callable[..., None]:
    """Add --ca-file to ``command`` and keep it out of its arguments (in the context's ``obj``)."""

    @functools.wraps(command)
    def wrapper(*args: Any, ca_file: Path | None, **kwargs: Any) -> None:
        click.get_current_context().obj = _tls(ca_file)
        command(*args, **kwargs)

    return ca_file_option(wrapper)


def _api(
    server: str | None, token: str | None, method: str, path: str, body: dict[str, Any] | None = None
) -> Any:
    tls = click.get_current_context().find_object(ssl.SSLContext)
    try:
        saved = load_login()
        token = token or saved.get("token")
        if not token:
            raise click.ClickException("no token: pass --token, set RELAY_TOKEN, or run relay-agent login")
        server = server or saved.get("server") or DEFAULT_SERVER
        return api_client.call(server, token, method, path, body, tls)
    except RelayError as exc:
        raise click.ClickException(str(exc)) from exc


def _settings_line(tunnel: dict[str, Any]) -> str:
    s = tunnel["settings"]
    retry = ",".join(str(code) for code in s["retry_on"])
    # Delivery slots now (an auto tunnel's move): one number, or one per destination.
    slots: dict[str, int] = tunnel.get("slots") or {}  # absent from servers before auto
    if len(slots) == 1:
        now = f" slots={next(iter(slots.values()))}"
    elif slots:
        now = " slots=" + ",".join(f"{destination}={n}" for destination, n in slots.items())
    else:
        now = ""
    return (
        f"{tunnel['name']:24} {s['mode']:6} agents={tunnel['agents']} max-concurrency={s['max_concurrency']}"
        f"{now} retry-on={retry} destinations={','.join(s['destinations'])}"
    )


@main.group("tunnel")
def tunnel_group() -> None:
    """Show and change tunnel settings (stored on the server) without connecting."""


@tunnel_group.command("show")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@api_options
def tunnel_show(name: str | None, as_json: bool, server: str | None, token: str | None) -> None:
    """Show the settings of NAME, or of all your tunnels."""
    data = _api(server, token, "GET", f"tunnels/{name}" if name else "tunnels")
    tunnels = [data] if name else data["tunnels"]
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for tunnel in tunnels:
        click.echo(_settings_line(tunnel))


@tunnel_group.command("set")
@click.argument("name")
@click.option("--mode", type=click.Choice(["queue", "live"]), default=None, help="queue or live.")
@click.option(
    "--retry-on", default=None, help="Statuses of the local service that are retried: 429,502,503,504."
)
@click.option(
    "--max-concurrency", type=ConcurrencyType(), default=None, help="Deliveries in flight at once, or auto."
)
@click.option(
    "--destination",
    "destinations",
    multiple=True,
    help="Fan-out: agent:LABEL, agent:* or an http(s) URL; repeatable; replaces the list.",
)
@api_options
def tunnel_set(
    name: str,
    mode: str | None,
    retry_on: str | None,
    max_concurrency: int | str | None,
    destinations: tuple[str, ...],
    server: str | None,
    token: str | None,
) -> None:
    """Change settings of NAME; what is not given stays as it is."""
    changes: dict[str, Any] = {}
    if mode:
        changes["mode"] = mode
    if max_concurrency is not None:
        changes["max_concurrency"] = max_concurrency
    if destinations:
        changes["destinations"] = list(destinations)
    if retry_on is not None:
        try:
            changes["retry_on"] = [int(code) for code in retry_on.split(",") if code.strip()]
        except ValueError as exc:
            raise click.BadParameter("a comma-separated list of statuses", param_hint="--retry-on") from exc
    if not changes:
        raise click.UsageError(
            "nothing to change: give --mode, --retry-on, --max-concurrency or --destination"
        )
    click.echo(_settings_line(_api(server, token, "PATCH", f"tunnels/{name}", changes)))


@main.group("events")
def events_group() -> None:
    """List, show and replay the webhooks your tunnels stored."""


@events_group.command("list")
@click.option("--name", default=None, help="Only this tunnel's events.")
@click.option(
    "--status",
    type=click.Choice(["pending", "retrying", "delivered", "dead"]),
    default=None,
    help="Only events with a delivery in this state.",
)
@click.option(
    "--limit",
    type=click.IntRange(1, 1000),
    default=50,
    help="Most events listed, newest first (with --all: per call to the server).",
)
@click.option("--before", metavar="CURSOR", default=None, help="Only events older than this page's cursor.")
@click.option("--all", "all_pages", is_flag=True, help="Follow the pages down to the oldest event.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@api_options
def events_list(
    name: str | None,
    status: str | None,
    limit: int,
    before: str | None,
    all_pages: bool,
    as_json: bool,
    server: str | None,
    token: str | None,
) -> None:
    """List events, newest first, a page at a time (--all: every one).

    When more remain, the command that lists the next page is printed on stderr."""
    filters = {k: v for k, v in (("name", name), ("status", status), ("limit", limit)) if v}
    listed: list[dict[str, Any]] = []
    if not as_json:
        click.echo(f"{'ID':34} {'TUNNEL':16} {'STATUS':9} {'TRIES':5} {'RECEIVED':24} REQUEST")
    cursor = before
    while True:
        query = urlencode({**filters, **({"before": cursor} if cursor else {})})
        data = _api(server, token, "GET", f"events?{query}")
        if as_json:
            listed += data["events"]
        else:
            for event in data["events"]:
                _event_rows(event)
        cursor = data.get("next")
        if not cursor or not all_pages:
            break
    if as_json:
        click.echo(json.dumps(listed, indent=2))
    if cursor:
        words = ["relay-agent", "events", "list"]
        words += [f"--{k}={v}" for k, v in filters.items()] + ([f"--server={server}"] if server else [])
        words += ["--json"] if as_json else []
        click.echo(f"more: {shlex.join([*words, f'--before={cursor}'])}", err=True)


def _event_rows(event: dict[str, Any]) -> None:
    """``events list``'s line for one event, and for a retrying or dead one its deliveries."""
    tries = max((d["attempts"] for d in event["deliveries"]), default=0)
    click.echo(
        f"{event['id']:34} {event['tunnel']:16} {event['status']:9} {tries:<5} "
        f"{event['received_at']:24} {event['method']} {event['target']}"
    )
    if event["status"] in ("retrying", "dead"):  # when, and why
        for d in event["deliveries"]:
            click.echo(f"{'':34} -> {d['destination']}: {_delivery_line(d)}")


@events_group.command("show")
@click.argument("event_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@api_options
def events_show(event_id: str, as_json: bool, server: str | None, token: str | None) -> None:
    """Show one event: its request, and its state at each destination."""
    event = _api(server, token, "GET", f"events/{event_id}")
    if as_json:
        click.echo(json.dumps(event, indent=2))
        return
    click.echo(f"{event['id']}  {event['status']}  tunnel {event['tunnel']}  received {event['received_at']}")
    click.echo(f"{event['method']} {event['target']}  from {event['client']}")
    for name, value in event["headers"]:
        click.echo(f"{name}: {value}")
    click.echo("")
    click.echo(event["body"] if event["body_encoding"] == "utf-8" else f"(base64) {event['body']}")
    click.echo("")
    for d in event["deliveries"]:
        click.echo(f"-> {d['destination']}: {_delivery_line(d)}")
        for attempt in d.get("history", []):
            outcome = attempt["status"] or attempt["error"] or "-"
            click.echo(f"   attempt {attempt['attempt']} at {attempt['at']}: {outcome}")


def _delivery_line(d: dict[str, Any]) -> str:
    """One destination's state in words: attempts, the last outcome, the next try or why dead."""
    last = d["last_status"] or d["last_error"] or "-"
    line = f"{d['status']} after {d['attempts']} attempt(s); last {last}"
    if d["status"] == "dead":
        return f"{line}; dead: {d.get('dead_reason') or '-'}"
    return f"{line}; next {d['next_attempt_at'] or '-'}" if d["status"] in ("pending", "retrying") else line


@events_group.command("replay")
@click.argument("event_id")
@api_options
def events_replay(event_id: str, server: str | None, token: str | None) -> None:
    """Deliver an event again, with the same event id."""
    answer = _api(server, token, "POST", f"events/{event_id}/replay")
    click.echo(f"replaying {answer['event']} to {', '.join(answer['replayed'])}")


def _event_loop() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop where it installs (a tenth of the agent's CPU per request,
    bench/), else asyncio's own; ``RELAY_EVENT_LOOP=asyncio`` picks asyncio's anyway."""
    if os.environ.get("RELAY_EVENT_LOOP") == "asyncio" or importlib.util.find_spec("uvloop") is None:
        return None
    return importlib.import_module("uvloop").new_event_loop  # type: ignore[no-any-return]
