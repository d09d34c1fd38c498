"""``relay-agent``: translates options into an ``AgentConfig`` and runs the tunnel; no logic here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time

import click
import jwt

from relay_protocol import RelayError, RequestHead, Welcome

from .config import DEFAULT_SERVER, AgentConfig, load_login, save_login
from .errors import Refused
from .target import parse_target
from .tunnel import Tunnel


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="relay")
def main() -> None:
    """relay-agent: receive your relay server's requests on a local service."""


@main.command("connect")
@click.option(
    "--forward",
    "forward_to",
    envvar="RELAY_FORWARD",
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
    "--log-level",
    envvar="RELAY_LOG_LEVEL",
    default="warning",
    show_envvar=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
    help="Log verbosity (stderr).",
)
def connect_command(
    forward_to: str,
    server: str | None,
    token: str | None,
    names: tuple[str, ...],
    host_header: str,
    log_level: str,
) -> None:
    """Connect to the relay server and forward its requests to a local service."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        saved = load_login()
        target = parse_target(forward_to)
    except RelayError as exc:
        raise click.ClickException(str(exc)) from exc
    token = token or saved.get("token")
    if not token:
        raise click.ClickException("no token: pass --token, set RELAY_TOKEN, or run relay-agent login")
    config = AgentConfig(
        server=(server or saved.get("server") or DEFAULT_SERVER).rstrip("/"),
        token=token,
        target=target,
        names=names,
        host_header=host_header,
    )
    try:
        config.agent_url  # noqa: B018 - validates the server URL before connecting
    except RelayError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        asyncio.run(_run(config))
    except Refused as exc:
        click.echo(f"relay-agent: the server refused this agent: {exc.reason}", err=True)
        sys.exit(1)


async def _run(config: AgentConfig) -> None:
    printed: list[str] = []

    def on_welcome(welcome: Welcome) -> None:
        lines = [
            f"Forwarding {url} -> {config.target.base_url}"
            for tunnel in welcome.tunnels
            for url in tunnel.get("urls", [])
        ]
        if lines != printed:
            printed[:] = lines
            for line in lines:
                click.echo(line)
        else:
            logging.getLogger("relay.agent").warning("reconnected")

    def on_request(head: RequestHead, status: int | str, seconds: float) -> None:
        path = head.target.decode("utf-8", "replace")
        click.echo(f"{time.strftime('%H:%M:%S')} {head.method:7} {path} {status} {seconds * 1000:.0f}ms")

    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await Tunnel(config, on_welcome, on_request).run()


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
