"""Issue 11 on real processes, without a browser: the ``Inspect`` line, ``--inspect`` and
``--no-inspect``, the inspector's API behind a real agent, and the console on a terminal."""

from __future__ import annotations

import json
import re
import socket
import urllib.error
import urllib.request

from .framework import FORWARDING, INSPECT, RELAY_AGENT, REQUEST_LINE, Relay, free_port, send, wait_until

WAIT = 20.0


def _get(url: str, host: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_the_inspect_line_comes_under_the_forwarding_lines(relay: Relay) -> None:
    port = free_port()
    tunnel = relay.tunnel(agent_extra=["--inspect", f"127.0.0.1:{port}"])
    assert tunnel.agent.inspector() == f"http://127.0.0.1:{port}"
    lines = tunnel.agent.process.stdout_lines
    assert [bool(FORWARDING.match(line)) for line in lines[:2]] == [True, True]
    assert lines[2] == f"Inspect    http://127.0.0.1:{port}"
    status, body = _get(f"http://127.0.0.1:{port}/api/status")
    assert status == 200
    assert tunnel.token not in body.decode()
    assert json.loads(body)["urls"] == [line.split()[1] for line in lines[:2]]


def test_a_webhook_is_recorded_with_its_event_id_and_attempt(relay: Relay) -> None:
    tunnel = relay.tunnel()
    inspector = tunnel.agent.inspector()
    reply = send(tunnel, "POST", "/hook", headers=[("Content-Type", "application/json")], body=b'{"n": 1}')
    assert reply.status == 200
    event_id = tunnel.target.seen("/hook")[0].header("X-Relay-Event-Id")

    def recorded() -> dict[str, object] | None:
        exchanges = json.loads(_get(f"{inspector}/api/exchanges")[1])["exchanges"]
        return next((e for e in exchanges if e["target"] == "/hook" and e["status"] is not None), None)

    exchange = wait_until(recorded, WAIT, "the exchange in the inspector")
    assert (exchange["event_id"], exchange["attempt"], exchange["status"]) == (event_id, 1, 200)
    # The same request with a Host that is not the inspector's: DNS rebinding, refused.
    port = inspector.rsplit(":", 1)[1]
    status, body = _get(f"{inspector}/api/exchanges", host=f"rebind.example:{port}")
    assert status == 403 and b"/hook" not in body


def test_no_inspect_serves_and_records_nothing(relay: Relay) -> None:
    port = free_port()
    tunnel = relay.tunnel(agent_extra=["--inspect", f"127.0.0.1:{port}", "--no-inspect"])
    assert send(tunnel, "GET", "/plain").status == 200
    lines = tunnel.agent.process.wait_for_line(REQUEST_LINE.format(method="GET", path="/plain", status=200))
    assert lines
    assert not any(INSPECT.match(line) for line in tunnel.agent.process.stdout_lines)
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0  # nothing listens


def test_a_taken_inspect_address_stops_the_agent_naming_it(relay: Relay) -> None:
    server = relay.server()
    target = relay.target()
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        agent = relay.agent(
            server,
            server.token("alice"),
            target.forward,
            ready=False,
            extra=["--inspect", f"127.0.0.1:{port}"],
        )
        assert agent.process.wait() == 1
    assert agent.process.stdout == ""
    assert re.search(
        rf"cannot serve the inspector on 127\.0\.0\.1:{port}: address already in use",
        agent.process.stderr,
        re.I,
    )


def test_on_a_terminal_the_console_draws_the_status_block(relay: Relay) -> None:
    server = relay.server()
    target = relay.target()
    token = server.token("alice")
    port = free_port()
    terminal = relay.terminal(
        [
            str(RELAY_AGENT),
            "connect",
            "--server",
            server.public_url,
            "--token",
            token,
            "--forward",
            target.forward,
            "--inspect",
            f"127.0.0.1:{port}",
        ],
        "relay-agent on a terminal",
    )
    terminal.wait_for(r"Session Status\s+online")
    text = terminal.text()
    assert re.search(rf"Forwarding\s+http://alice\.localhost:{server.port} -> http://{target.forward}", text)
    assert re.search(rf"Forwarding\s+http://localhost:{server.port}/t/alice -> http://{target.forward}", text)
    assert re.search(rf"Inspect\s+http://127\.0\.0\.1:{port}", text)
    assert token not in text
    tunnel_host = f"localhost:{server.port}"
    reply = send_through(server.port, tunnel_host, "/t/alice/from-terminal")
    assert reply == 200
    terminal.wait_for(r"GET\s+/from-terminal 200 \d+ms")
    terminal.wait_for(r"Requests\s+1 total, 0 failed")
    terminal.wait_for(r"Latency\s+p50 \d+ms, p90 \d+ms")


def send_through(port: int, host: str, path: str) -> int:
    status, _ = _get(f"http://127.0.0.1:{port}{path}", host=host)
    return status
