"""`relay-server serve --dev` (what `make run` starts): a ready token and the exact agent command."""

from __future__ import annotations

import shlex

import aiohttp

from .framework import RELAY_SERVER, Agent, Relay, Tunnel, free_port, through


async def test_the_printed_agent_command_connects_and_serves(
    relay: Relay, http: aiohttp.ClientSession
) -> None:
    port = free_port()
    server = relay.spawn(
        [str(RELAY_SERVER), "serve", "--dev", "--port", str(port), "--data-dir", str(relay.new_dir("dev"))],
        "relay-server --dev",
    )
    [match] = server.wait_for_line(r"^\s+(\S*relay-agent connect .*)$")
    argv = shlex.split(match.group(1))
    assert argv[1:4] == ["connect", "--server", f"http://localhost:{port}"]
    assert argv[4] == "--token" and argv[5].count(".") == 2  # a JWT
    target = relay.target("dev-target")
    argv[argv.index("--forward") + 1] = target.forward  # the user's own local service
    agent = Agent(relay.spawn(argv, "relay-agent (printed command)"))
    assert [url for url, _ in agent.ready()] == [
        f"http://dev.localhost:{port}",
        f"http://localhost:{port}/t/dev",
    ]
    dev_server = relay.server(port=port, start=False)  # only for its URL helpers
    reply = await through(http, Tunnel(dev_server, target, agent, "dev", argv[5]), "path", "GET", "/hello")
    assert reply.status == 200
    assert reply.json()["path"] == "/hello"
