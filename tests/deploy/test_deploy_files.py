"""The shipped deploy files (deploy/, docs/deploy.md), each checked by its own tool and
against the CLI, so they cannot drift from what relay-server and relay-agent accept.

- Caddyfile: ``caddy validate``, ``caddy fmt``, the adapted JSON, and a real Caddy (with a
  local CA on loopback ports) in front of a stand-in for relay-server.
- nginx.conf: ``nginx -t`` inside a minimal main config, and a real nginx the same way.
- relay-server.service: ``systemd-analyze verify`` (with ExecStart pointed at this venv).
- Dockerfile and compose.yaml: their structure (``docker compose config`` too, where the
  compose plugin is installed), and the Dockerfile's health check run for real.
- every ``relay-server``/``relay-agent`` option and ``RELAY_*`` variable in these files
  exists in the click commands.

A missing tool skips its tests on a developer's machine and fails them in CI (``CI=true``),
where .ci/run installs caddy and nginx.
"""

from __future__ import annotations

import datetime
import http.client
import http.server
import ipaddress
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCS = ROOT / "docs" / "deploy.md"
IN_CI = os.environ.get("CI", "").lower() == "true"

DOMAIN = "relay.example.com"
CLAIMED = f"alice.{DOMAIN}"
UNCLAIMED = f"bob.{DOMAIN}"
#: Seconds a proxy gets to start listening, or to pass a request, before a test fails.
WAIT = 10.0
#: Seconds the stand-in upstream holds back the rest of a streamed response: longer than
#: WAIT, so a proxy that buffers it fails the test instead of passing it late.
HOLD = 3 * WAIT


def _tool(name: str) -> str:
    """The path of ``name``: skipped when it is missing, except in CI, where it fails."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path:
        return path
    if IN_CI:
        pytest.fail(f"{name} is not installed: .ci/run installs it, and CI must run this test")
    pytest.skip(f"{name} is not installed (CI installs it and runs this test)")


def _run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False, **kwargs)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_for_port(port: int, process: subprocess.Popen[str], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{what} exited with {process.returncode}: {process.communicate()[1][-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    pytest.fail(f"{what} did not listen on port {port} within {WAIT}s")


def _stop(process: subprocess.Popen[str]) -> None:
    process.terminate()
    try:
        process.wait(timeout=WAIT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# -- a stand-in for relay-server behind the proxies ------------------------------------------


@dataclass
class Upstream:
    """What relay-server looks like to a front proxy: the ask endpoint (yes for the apex
    and for the claimed name), /healthz, a download that waits between its two lines, and
    an echo of every other request. Records every request it gets."""

    port: int = 0
    seen: list[tuple[str, list[tuple[str, str]]]] = field(default_factory=list)
    rest_of_stream: threading.Event = field(default_factory=threading.Event)


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    state = Upstream()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self._answer()

        def do_POST(self) -> None:
            self._answer()

        def _answer(self) -> None:
            state.seen.append((self.path, list(self.headers.items())))
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            if self.path.startswith("/_relay/tls-ask?domain="):
                domain = self.path.partition("=")[2]
                self._send(200 if domain in (DOMAIN, CLAIMED) else 404, b"")
            elif self.headers.get("Upgrade"):
                # Enough of a websocket server for a proxy: as strict about the upgrade's
                # headers as aiohttp, then an echo of the bytes that follow, reversed.
                connection = {t.strip().lower() for t in self.headers.get("Connection", "").split(",")}
                if self.headers["Upgrade"].lower() != "websocket" or "upgrade" not in connection:
                    self._send(400, b"not a websocket upgrade")
                    return
                self.send_response(101)
                self.send_header("Upgrade", "websocket")
                self.send_header("Connection", "Upgrade")
                self.send_header("Sec-WebSocket-Accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
                self.end_headers()
                self.wfile.flush()
                while data := self.connection.recv(65536):
                    self.connection.sendall(data[::-1])
                self.close_connection = True
            elif self.path == "/stream":
                # A slow download of known length: a proxy that buffers it holds the
                # first line until the second is written, HOLD seconds later at most.
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(b"first\nsecond\n")))
                self.end_headers()
                self.wfile.write(b"first\n")
                self.wfile.flush()
                state.rest_of_stream.wait(HOLD)
                self.wfile.write(b"second\n")
            else:
                head = {"path": self.path, "headers": list(self.headers.items()), "body": body.decode()}
                self._send(200, json.dumps(head).encode())

        def _send(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    state.rest_of_stream.set()
    server.shutdown()
    server.server_close()


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def _connect(port: int, host: str, ca: Path | None) -> http.client.HTTPSConnection:
    """An HTTPS connection to 127.0.0.1:``port`` for ``host`` (SNI, Host, and the name the
    certificate is checked against when ``ca`` is given)."""
    context = ssl.create_default_context(cafile=str(ca) if ca else None)
    if ca is None:  # a handshake that is expected to fail, or to be read by no one
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    connection = http.client.HTTPSConnection(host, port, context=context, timeout=WAIT)
    raw = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    connection.sock = context.wrap_socket(raw, server_hostname=host)
    return connection


def _send(
    connection: http.client.HTTPConnection, method: str, path: str, headers: dict[str, str], body: bytes = b""
) -> http.client.HTTPResponse:
    # skip_accept_encoding: the request arrives with no Accept-Encoding, so a test sees
    # whether the proxy adds one.
    connection.putrequest(method, path, skip_accept_encoding=True)
    for name, value in headers.items():
        connection.putheader(name, value)
    if body or method == "POST":
        connection.putheader("Content-Length", str(len(body)))
    connection.endheaders(body)
    return connection.getresponse()


def _https(port: int, host: str, path: str, ca: Path | None, headers: dict[str, str] | None = None) -> Answer:
    connection = _connect(port, host, ca)
    try:
        response = _send(connection, "GET", path, headers or {})
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        connection.close()


#: Headers a client sends that only a proxy may set: none may reach relay-server from one.
FORGED = {
    "X-Forwarded-For": "10.9.9.9",
    "X-Forwarded-Proto": "gopher",
    "X-Forwarded-Host": "evil.example",
    "X-Forwarded-Port": "1",
    "X-Real-IP": "10.8.8.8",
    "Forwarded": "for=10.7.7.7",
}


def _check_proxy(port: int, ca: Path | None, upstream: Upstream) -> None:
    """What either proxy must do, seen by a client and by the stand-in upstream."""
    # A tunnel's request reaches relay-server with its Host, the proxy's forwarding
    # headers in place of the client's forged ones, and nothing added.
    connection = _connect(port, CLAIMED, ca)
    response = _send(connection, "POST", "/hook?x=1", FORGED, b'{"hello": 1}')
    echoed = json.loads(response.read())
    connection.close()
    assert response.status == 200
    assert echoed["path"] == "/hook?x=1"
    assert echoed["body"] == '{"hello": 1}'
    got = {name.lower(): value for name, value in echoed["headers"]}
    assert got["host"].split(":")[0] == CLAIMED
    assert got["x-forwarded-for"] == "127.0.0.1"
    assert got["x-forwarded-proto"] == "https"
    assert got["x-forwarded-host"].split(":")[0] == CLAIMED
    leaked = {"x-forwarded-port", "x-real-ip", "forwarded", "accept-encoding"} & set(got)
    assert not leaked, f"reached relay-server from the client or the proxy: {leaked}"

    # /metrics and the ask endpoint on the apex are answered by the proxy itself; on a
    # tunnel's host they are the user's app's paths and pass.
    def proxied() -> list[str]:  # what reached relay-server, less Caddy's own asks
        return [path for path, _ in upstream.seen if not path.startswith("/_relay/tls-ask")]

    before = proxied()
    assert _https(port, DOMAIN, "/metrics", ca).status == 404
    assert _https(port, DOMAIN, "/_relay/tls-ask?domain=x." + DOMAIN, ca).status == 404
    assert proxied() == before, "the proxy let an internal endpoint through"
    assert _https(port, CLAIMED, "/metrics", ca).status == 200
    assert upstream.seen[-1][0] == "/metrics"
    assert _https(port, DOMAIN, "/healthz", ca).status == 200

    # A websocket upgrade (the agents' /_relay/agent) passes, and then bytes both ways.
    raw = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    context = ssl.create_default_context(cafile=str(ca) if ca else None)
    with context.wrap_socket(raw, server_hostname=DOMAIN) as tls:
        tls.sendall(
            f"GET /_relay/agent HTTP/1.1\r\nHost: {DOMAIN}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += tls.recv(4096) or pytest.fail(f"the proxy closed the upgrade: {head!r}")
        assert head.startswith(b"HTTP/1.1 101 "), head
        assert re.search(rb"(?im)^upgrade: *websocket\r$", head), head
        tls.sendall(b"\x81\x05hello")
        echoed = head.partition(b"\r\n\r\n")[2]
        while len(echoed) < 7:
            echoed += tls.recv(4096) or pytest.fail(f"the proxy closed the websocket: {echoed!r}")
        assert echoed == b"olleh\x05\x81"

    # A response reaches the client as the upstream writes it: the first line arrives
    # (within WAIT, the socket's timeout) while the upstream still holds back the second.
    connection = _connect(port, CLAIMED, ca)
    response = _send(connection, "GET", "/stream", {})
    assert response.status == 200
    assert response.readline() == b"first\n"
    upstream.rest_of_stream.set()
    assert response.read() == b"second\n"
    connection.close()


# -- Caddy ----------------------------------------------------------------------------------

CADDY_ENV = {"RELAY_DOMAIN": DOMAIN, "ACME_EMAIL": "ops@example.com"}


def _caddy_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    # Caddy keeps its state under HOME/XDG dirs: a test's own, never the user's.
    return {
        **os.environ,
        "HOME": str(tmp_path),
        "XDG_DATA_HOME": str(tmp_path / "data"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        **CADDY_ENV,
        **extra,
    }


def _caddy_json(tmp_path: Path, **extra: str) -> dict[str, Any]:
    caddy = _tool("caddy")
    done = _run(
        [caddy, "adapt", "--adapter", "caddyfile", "--config", str(DEPLOY / "Caddyfile")],
        env=_caddy_env(tmp_path, **extra),
    )
    assert done.returncode == 0, done.stderr
    config: dict[str, Any] = json.loads(done.stdout)
    return config


def _handlers(node: Any) -> Iterator[dict[str, Any]]:
    """Every handler in an adapted config, however deeply its routes nest."""
    if isinstance(node, dict):
        if "handler" in node:
            yield node
        for value in node.values():
            yield from _handlers(value)
    elif isinstance(node, list):
        for value in node:
            yield from _handlers(value)


def test_caddyfile_validates(tmp_path: Path) -> None:
    caddy = _tool("caddy")
    done = _run(
        [caddy, "validate", "--adapter", "caddyfile", "--config", str(DEPLOY / "Caddyfile")],
        env=_caddy_env(tmp_path),
    )
    assert done.returncode == 0, done.stderr
    assert "Valid configuration" in done.stdout + done.stderr


def test_caddyfile_is_formatted() -> None:
    caddy = _tool("caddy")
    done = _run([caddy, "fmt", str(DEPLOY / "Caddyfile")])
    assert done.returncode == 0, done.stderr
    assert done.stdout == (DEPLOY / "Caddyfile").read_text(), "run: caddy fmt --overwrite deploy/Caddyfile"


def test_caddyfile_on_demand_tls_asks_relay_server(tmp_path: Path) -> None:
    config = _caddy_json(tmp_path)
    automation = config["apps"]["tls"]["automation"]
    assert automation["on_demand"]["ask"] == "http://127.0.0.1:8000/_relay/tls-ask"
    (policy,) = automation["policies"]
    assert policy["on_demand"] is True
    assert sorted(policy["subjects"]) == sorted([DOMAIN, f"*.{DOMAIN}"])
    assert all(issuer.get("email") == CADDY_ENV["ACME_EMAIL"] for issuer in policy["issuers"])
    # compose.yaml's caddy points both the ask and the proxy at the relay service.
    in_compose = _caddy_json(tmp_path, RELAY_UPSTREAM="relay:8000")
    assert in_compose["apps"]["tls"]["automation"]["on_demand"]["ask"] == "http://relay:8000/_relay/tls-ask"
    (proxy,) = [h for h in _handlers(in_compose) if h["handler"] == "reverse_proxy"]
    assert proxy["upstreams"] == [{"dial": "relay:8000"}]


def test_caddyfile_streams_and_passes_requests_as_they_are(tmp_path: Path) -> None:
    (proxy,) = [h for h in _handlers(_caddy_json(tmp_path)) if h["handler"] == "reverse_proxy"]
    assert proxy["upstreams"] == [{"dial": "127.0.0.1:8000"}]
    assert proxy["flush_interval"] == -1
    assert proxy["transport"] == {"protocol": "http", "compression": False}
    assert "buffer_requests" not in proxy
    removed = set(proxy["headers"]["request"]["delete"])
    assert {"Forwarded", "X-Real-IP", "X-Forwarded-Port"} <= removed
    # Caddy's own X-Forwarded-For/-Proto/-Host must stay.
    assert not {"X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host"} & removed


def test_caddy_in_front_of_relay_server(tmp_path: Path, upstream: Upstream) -> None:
    """The shipped Caddyfile, run: only the global options for a test are added (a local
    CA instead of Let's Encrypt, loopback ports, no admin endpoint)."""
    caddy = _tool("caddy")
    http_port, https_port = _free_port(), _free_port()
    store = tmp_path / "store"
    test_options = (
        f"\tadmin off\n\thttp_port {http_port}\n\thttps_port {https_port}\n"
        f"\tdefault_bind 127.0.0.1\n\tlocal_certs\n\tskip_install_trust\n"
        f"\tstorage file_system {store}\n"
    )
    shipped = (DEPLOY / "Caddyfile").read_text()
    assert "\n{\n" in shipped, "the Caddyfile has lost its global options block"
    caddyfile = tmp_path / "Caddyfile"
    caddyfile.write_text(shipped.replace("\n{\n", "\n{\n" + test_options, 1))
    env = _caddy_env(tmp_path, RELAY_UPSTREAM=f"127.0.0.1:{upstream.port}")
    process = subprocess.Popen(
        [caddy, "run", "--adapter", "caddyfile", "--config", str(caddyfile)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_port(https_port, process, "caddy")
        ca = store / "pki" / "authorities" / "local" / "root.crt"
        deadline = time.monotonic() + WAIT
        while not ca.exists() and time.monotonic() < deadline:
            time.sleep(0.05)

        # A claimed name gets its certificate (checked against Caddy's CA) on its first
        # handshake, after Caddy asked relay-server; an unclaimed one gets none.
        _check_proxy(https_port, ca, upstream)
        asked = [path for path, _ in upstream.seen if path.startswith("/_relay/tls-ask")]
        assert f"/_relay/tls-ask?domain={CLAIMED}" in asked
        with pytest.raises(ssl.SSLError):
            _https(https_port, UNCLAIMED, "/", None)
        assert f"/_relay/tls-ask?domain={UNCLAIMED}" in [path for path, _ in upstream.seen]
        assert not any(path == "/" for path, _ in upstream.seen)

        # Plain HTTP is redirected to HTTPS.
        connection = http.client.HTTPConnection("127.0.0.1", http_port, timeout=WAIT)
        connection.request("GET", "/hook", headers={"Host": CLAIMED})
        response = connection.getresponse()
        assert response.status in (301, 308)
        assert response.getheader("Location", "").startswith(f"https://{CLAIMED}")
        connection.close()
    finally:
        _stop(process)


# -- nginx ----------------------------------------------------------------------------------


def _certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for the apex and the wildcard, and its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DOMAIN)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(DOMAIN), x509.DNSName(f"*.{DOMAIN}")]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "fullchain.pem", directory / "privkey.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_file, key_file


def _nginx_config(tmp_path: Path, site: str, *, foreground: bool = False) -> Path:
    """``site`` (http-context content, as in conf.d) inside a main config whose pid file,
    logs and temp paths are all in ``tmp_path``, with the shipped certificate paths
    replaced by a self-signed pair made here."""
    cert_file, key_file = _certificate(tmp_path)
    live = f"/etc/letsencrypt/live/{DOMAIN}/"
    assert f"{live}fullchain.pem" in site and f"{live}privkey.pem" in site
    site = site.replace(f"{live}fullchain.pem", str(cert_file)).replace(f"{live}privkey.pem", str(key_file))
    (tmp_path / "relay.conf").write_text(site)
    temp = "\n".join(
        f"    {kind}_temp_path {tmp_path / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    main = tmp_path / "nginx.conf"
    main.write_text(
        f"pid {tmp_path / 'nginx.pid'};\n"
        f"error_log {tmp_path / 'error.log'};\n" + ("daemon off;\n" if foreground else "") + "events {}\n"
        f"http {{\n    access_log off;\n{temp}\n    include {tmp_path / 'relay.conf'};\n}}\n"
    )
    return main


def _nginx(main: Path, *args: str) -> list[str]:
    return [
        _tool("nginx"),
        "-c",
        str(main),
        "-p",
        str(main.parent),
        "-e",
        str(main.parent / "error.log"),
        *args,
    ]


def test_nginx_conf_passes_nginx_t(tmp_path: Path) -> None:
    done = _run(_nginx(_nginx_config(tmp_path, (DEPLOY / "nginx.conf").read_text()), "-t"))
    assert done.returncode == 0, done.stderr
    assert "test is successful" in done.stderr


def test_nginx_conf_streams_and_upgrades() -> None:
    text = (DEPLOY / "nginx.conf").read_text()
    directives = {line.strip() for line in text.splitlines() if not line.strip().startswith("#")}
    assert re.search(r"map \$http_upgrade \$connection_upgrade \{\s*default\s+upgrade;\s*''\s+'';\s*\}", text)
    for directive in (
        "proxy_buffering off;",
        "proxy_request_buffering off;",
        "proxy_http_version 1.1;",
        "proxy_set_header Upgrade $http_upgrade;",
        "proxy_set_header Connection $connection_upgrade;",
        "proxy_set_header Host $host;",
        "proxy_set_header X-Forwarded-Proto $scheme;",
        "proxy_set_header X-Forwarded-Host $host;",
        "client_max_body_size 0;",
        f"server_name {DOMAIN} *.{DOMAIN};",
    ):
        assert directive in directives, directive
    # Longer than relay-server's own --idle-timeout (300 s), so the relay decides.
    (read_timeout,) = re.findall(r"proxy_read_timeout (\d+)s;", text)
    assert int(read_timeout) > 300


def test_nginx_in_front_of_relay_server(tmp_path: Path, upstream: Upstream) -> None:
    """The shipped nginx.conf, run, with loopback ports in place of 80 and 443."""
    http_port, https_port = _free_port(), _free_port()
    site = (DEPLOY / "nginx.conf").read_text()
    replacements = {
        "    listen 80;\n": f"    listen 127.0.0.1:{http_port};\n",
        "    listen [::]:80;\n": "",
        "    listen 443 ssl http2;\n": f"    listen 127.0.0.1:{https_port} ssl http2;\n",
        "    listen [::]:443 ssl http2;\n": "",
        "server 127.0.0.1:8000;": f"server 127.0.0.1:{upstream.port};",
    }
    for old, new in replacements.items():
        assert old in site, old
        site = site.replace(old, new)
    main = _nginx_config(tmp_path, site, foreground=True)
    process = subprocess.Popen(_nginx(main), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_port(https_port, process, "nginx")
        _check_proxy(https_port, tmp_path / "fullchain.pem", upstream)
        connection = http.client.HTTPConnection("127.0.0.1", http_port, timeout=WAIT)
        connection.request("POST", "/hook?x=1", body=b"{}", headers={"Host": CLAIMED})
        response = connection.getresponse()
        # 308 keeps the method and body of a webhook sent to http://.
        assert response.status == 308
        assert response.getheader("Location") == f"https://{CLAIMED}/hook?x=1"
        connection.close()
    finally:
        _stop(process)


# -- systemd --------------------------------------------------------------------------------

UNIT = DEPLOY / "relay-server.service"
#: Where docs/deploy.md installs the command (pipx with PIPX_BIN_DIR).
INSTALLED = "/usr/local/bin/relay-server"


def _unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_unit_is_hardened_and_drains() -> None:
    settings = _unit_settings()
    expected = {
        "User": "relay",
        "StateDirectory": "relay",
        "EnvironmentFile": "/etc/relay/relay-server.env",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "CapabilityBoundingSet": "",
        "Restart": "on-failure",
        "KillSignal": "SIGTERM",
        # relay-server waits 10 s for requests in flight, then closes its agents.
        "TimeoutStopSec": "30",
        "ExecStart": f"{INSTALLED} serve",
    }
    for key, value in expected.items():
        assert settings.get(key) == [value], f"{key}={settings.get(key)}"
    assert "DynamicUser" not in settings
    assert settings["Environment"] == ["RELAY_DATA_DIR=/var/lib/relay"]
    # relay-server keeps --max-connections (10,000) 64 below the descriptor limit.
    assert int(settings["LimitNOFILE"][0]) >= 10_000 + 64
    assert INSTALLED in DOCS.read_text()


def _verify(unit: Path) -> subprocess.CompletedProcess[str]:
    return _run([_tool("systemd-analyze"), "verify", "--man=no", str(unit)])


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    if not (shutil.which("systemd-analyze") or IN_CI):
        pytest.skip("systemd-analyze is not installed")
    # verify needs a systemd it can load units with; a container may have the binary
    # but not that. A minimal unit tells: where even it fails, the tool cannot run here.
    probe = tmp_path / "probe.service"
    probe.write_text(f"[Service]\nExecStart={sys.executable} -c pass\n")
    if (done := _verify(probe)).returncode != 0:
        if IN_CI:
            pytest.fail(f"systemd-analyze is installed but cannot verify a minimal unit: {done.stderr}")
        pytest.skip(f"systemd-analyze cannot verify units here: {done.stderr.strip()[:200]}")

    # verify checks that ExecStart's binary exists: point it at this venv's relay-server,
    # keeping every other line as shipped.
    executable = Path(sys.executable).parent / "relay-server"
    assert executable.exists(), executable
    lines = UNIT.read_text().splitlines()
    assert f"ExecStart={INSTALLED} serve" in lines
    unit = tmp_path / UNIT.name
    unit.write_text(
        "\n".join(
            f"ExecStart={executable} serve" if line.startswith("ExecStart=") else line for line in lines
        )
        + "\n"
    )
    done = _verify(unit)
    assert done.returncode == 0, done.stderr
    # Unknown keys and values that do not parse are only warnings (exit 0): any line
    # about this unit is a mistake in it.
    complaints = [line for line in done.stderr.splitlines() if UNIT.name in line]
    assert not complaints, "\n".join(complaints)


def test_env_example_is_an_environment_file() -> None:
    for line in (DEPLOY / "relay-server.env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            assert re.fullmatch(r"RELAY_[A-Z_]+=(\"[^\"]*\"|[^\s\"']*)", line), line


# -- Dockerfile and compose.yaml ------------------------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions, as (INSTRUCTION, arguments), continuations joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    instructions = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            instruction, _, arguments = line.strip().partition(" ")
            instructions.append((instruction.upper(), " ".join(arguments.split())))
    return instructions


def _instruction(name: str) -> list[str]:
    return [arguments for instruction, arguments in _dockerfile() if instruction == name]


def test_dockerfile_structure() -> None:
    (base,) = _instruction("FROM")
    match = re.fullmatch(r"python:3\.(\d+)-slim", base)
    assert match and int(match.group(1)) >= 11, base
    env = " ".join(_instruction("ENV"))
    for setting in ("RELAY_DATA_DIR=/data", "RELAY_HOST=0.0.0.0", "RELAY_PORT=8000"):
        assert setting in env.split(), setting
    assert _instruction("VOLUME") == ["/data"]
    assert _instruction("EXPOSE") == ["8000"]
    assert _instruction("STOPSIGNAL") == ["SIGTERM"]
    assert [json.loads(a) for a in _instruction("ENTRYPOINT")] == [["relay-server"]]
    assert [json.loads(a) for a in _instruction("CMD")] == [["serve"]]
    # It runs as an unprivileged user, set after the last step that needs root.
    steps = [instruction for instruction, _ in _dockerfile()]
    (user,) = _instruction("USER")
    assert user not in ("root", "0") and not user.startswith(("root:", "0:"))
    assert steps.index("USER") > max(i for i, step in enumerate(steps) if step == "RUN")


def test_dockerfile_copies_what_the_package_is_built_from() -> None:
    copied = set()
    for arguments in _instruction("COPY"):
        *sources, _ = arguments.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such file in the build context"
            copied.add(source)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {package.split(".")[0] for package in project["tool"]["setuptools"]["packages"]}
    needed = {"pyproject.toml", project["project"]["readme"], *packages}
    assert needed <= copied, f"the image would be built without {needed - copied}"


def _healthcheck_code() -> str:
    (healthcheck,) = _instruction("HEALTHCHECK")
    command = json.loads(healthcheck[healthcheck.index("CMD") + 3 :])
    assert command[:2] == ["python", "-c"], command
    code: str = command[2]
    assert "/healthz" in code
    return code


def test_dockerfile_healthcheck_asks_healthz() -> None:
    """The health check's one-liner, run: 0 while /healthz answers, non-zero when not."""
    code = _healthcheck_code()

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/healthz" else 404)
            self.send_header("Content-Length", "3")
            self.end_headers()
            self.wfile.write(b"ok\n")

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {**os.environ, "RELAY_PORT": str(server.server_address[1])}
        assert _run([sys.executable, "-c", code], env=env).returncode == 0
    finally:
        server.shutdown()
        server.server_close()
    env = {**os.environ, "RELAY_PORT": str(_free_port())}
    assert _run([sys.executable, "-c", code], env=env).returncode != 0


def _strip_comment(line: str) -> str:
    quote = ""
    for index, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1] in " \t"):
            return line[:index].rstrip()
    return line.rstrip()


def _scalar(text: str, number: int) -> str:
    if text[0] in "[{&*!|>%@`":
        raise ValueError(f"line {number}: {text!r} is outside the YAML subset this test reads")
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        if "\\" in text:
            raise ValueError(f"line {number}: escapes are outside the YAML subset this test reads")
        return text[1:-1].replace("''", "'") if text[0] == "'" else text[1:-1]
    return text


def load_block_yaml(text: str) -> Any:
    """Block-style YAML as compose.yaml is written (mappings, lists, plain or quoted
    string scalars), for machines without PyYAML; anything else raises ValueError rather
    than be misread. Scalars stay strings (compose.yaml quotes what is not one)."""
    lines = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = _strip_comment(raw)
        if line.strip():
            stripped = line.lstrip(" ")
            if stripped.startswith("\t"):
                raise ValueError(f"line {number}: a tab in the indentation")
            lines.append([number, len(line) - len(stripped), stripped])

    def block(i: int, indent: int) -> tuple[Any, int]:
        return (sequence if lines[i][2].startswith("- ") else mapping)(i, indent)

    def nested(i: int, indent: int) -> tuple[Any, int]:
        if i < len(lines) and lines[i][1] > indent:
            return block(i, lines[i][1])
        return None, i

    def mapping(i: int, indent: int) -> tuple[dict[str, Any], int]:
        result: dict[str, Any] = {}
        while i < len(lines) and lines[i][1] == indent:
            number, _, line = lines[i]
            key, colon, rest = line.partition(":")
            if not colon or (rest and not rest.startswith(" ")) or line.startswith("- "):
                raise ValueError(f"line {number}: expected 'key: value', got {line!r}")
            if key in result:
                raise ValueError(f"line {number}: {key!r} twice")
            if rest.strip():
                result[key], i = _scalar(rest.strip(), number), i + 1
            else:
                result[key], i = nested(i + 1, indent)
        if i < len(lines) and lines[i][1] > indent:
            raise ValueError(f"line {lines[i][0]}: unexpected indentation")
        return result, i

    def sequence(i: int, indent: int) -> tuple[list[Any], int]:
        result: list[Any] = []
        while i < len(lines) and lines[i][1] == indent and lines[i][2].startswith("- "):
            number, _, line = lines[i]
            item = line[2:].strip()
            if re.match(r"[\w.-]+:( |$)", item):  # a mapping, its first key on the dash's line
                lines[i] = [number, indent + 2, item]
                value, i = mapping(i, indent + 2)
            else:
                value, i = _scalar(item, number), i + 1
            result.append(value)
        return result, i

    value, end = block(0, lines[0][1])
    if end != len(lines):
        raise ValueError(f"line {lines[end][0]}: unexpected indentation")
    return value


def _compose() -> dict[str, Any]:
    text = (DEPLOY / "compose.yaml").read_text()
    parsed: dict[str, Any] = load_block_yaml(text)
    try:
        import yaml
    except ImportError:
        return parsed
    assert yaml.safe_load(text) == parsed, "PyYAML reads compose.yaml differently from load_block_yaml"
    return parsed


def test_compose_structure() -> None:
    compose = _compose()
    relay, caddy = compose["services"]["relay"], compose["services"]["caddy"]
    assert set(compose["services"]) == {"relay", "caddy"}
    assert relay["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    assert caddy["image"] == "caddy:2"
    # Only Caddy is reachable from outside.
    assert "ports" not in relay
    assert {"80:80", "443:443"} <= set(caddy["ports"])
    assert relay["volumes"] == ["relay-data:/data"]
    assert set(caddy["volumes"]) == {
        "./Caddyfile:/etc/caddy/Caddyfile:ro",
        "caddy-data:/data",
        "caddy-config:/config",
    }
    assert (DEPLOY / "Caddyfile").exists()
    assert set(compose["volumes"]) == {"relay-data", "caddy-data", "caddy-config"}
    assert relay["stop_grace_period"] == "30s"
    # Caddy waits for the Dockerfile's HEALTHCHECK.
    assert caddy["depends_on"] == {"relay": {"condition": "service_healthy"}}
    assert _instruction("HEALTHCHECK")
    # relay-server believes forwarding headers from Caddy's own fixed address alone: not
    # the network, which holds Docker's gateway, where every outside client may arrive from.
    (network,) = compose["networks"]
    assert relay["networks"] == [network]
    caddy_address = caddy["networks"][network]["ipv4_address"]
    (ipam,) = compose["networks"][network]["ipam"]["config"]
    subnet = ipaddress.ip_network(ipam["subnet"])
    assert ipaddress.ip_address(caddy_address) in subnet
    assert caddy_address != str(next(subnet.hosts()))  # not the gateway
    assert relay["environment"]["RELAY_TRUSTED_PROXY"] == f"{caddy_address}/32"
    # The Caddyfile's ask and proxy reach the relay service where its Dockerfile listens.
    assert caddy["environment"]["RELAY_UPSTREAM"] == "relay:8000"
    assert "RELAY_PORT=8000" in " ".join(_instruction("ENV")).split()
    assert relay["environment"]["RELAY_PUBLIC_URL"].startswith("https://${RELAY_DOMAIN")


def test_compose_sets_every_caddyfile_variable_without_default() -> None:
    placeholders = re.findall(r"\{\$([A-Z_]+)(:[^}]*)?\}", (DEPLOY / "Caddyfile").read_text())
    required = {name for name, default in placeholders if not default}
    assert required == {"RELAY_DOMAIN", "ACME_EMAIL"}
    caddy = _compose()["services"]["caddy"]
    assert required <= set(caddy["environment"])
    # docs/deploy.md gives Caddy's systemd service the same.
    drop_in = re.search(r"Environment=(.*)\\n", DOCS.read_text())
    assert drop_in and required <= {item.partition("=")[0] for item in drop_in.group(1).split()}


def test_block_yaml_reader_refuses_what_it_cannot_read() -> None:
    assert load_block_yaml("a:\n  - b: 1\n    c: '2'\n  - d\ne:\n") == {
        "a": [{"b": "1", "c": "2"}, "d"],
        "e": None,
    }
    for text in ("a: [1, 2]\n", "a: {b: 1}\n", "a: &x 1\n", "a: |\n  x\n", "a:\n  b: 1\n   c: 2\n"):
        with pytest.raises(ValueError):
            load_block_yaml(text)


def test_docker_compose_config(tmp_path: Path) -> None:
    docker = shutil.which("docker")
    if not docker or _run([docker, "compose", "version"]).returncode != 0:
        pytest.skip("no docker compose plugin: test_compose_structure reads the file instead")
    done = _run(
        [docker, "compose", "-f", str(DEPLOY / "compose.yaml"), "config", "--format", "json"],
        env={**os.environ, **CADDY_ENV},
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    config = json.loads(done.stdout)
    assert set(config["services"]) == {"relay", "caddy"}
    assert config["services"]["relay"]["environment"]["RELAY_PUBLIC_URL"] == f"https://{DOMAIN}"


# -- the files against the CLI --------------------------------------------------------------

#: Files whose commands and variables are checked against the CLI.
DOCUMENTED = [
    *(
        DEPLOY / name
        for name in ("Caddyfile", "relay-server.service", "relay-server.env.example", "Dockerfile")
    ),
    DEPLOY / "compose.yaml",
    DEPLOY / "nginx.conf",
    DOCS,
]
#: RELAY_* names that are not click options, and what they are.
NOT_OPTIONS = {
    "RELAY_DOMAIN": "the Caddyfile's and compose.yaml's domain placeholder",
    "RELAY_UPSTREAM": "the Caddyfile's proxy target placeholder",
    "RELAY_SECRET": "relay_server.tokens.SECRET_ENV, read by the store's secret loader",
    "RELAY_MYPYC": "setup.py's switch for the compiled build, read when the package is built",
}


def _commands(
    group: click.Command, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    yield path, group
    if isinstance(group, click.Group):
        for name, command in group.commands.items():
            yield from _commands(command, (*path, name))


def _clis() -> dict[str, click.Command]:
    from relay_agent.cli import main as agent
    from relay_server.cli import main as server

    return {"relay-server": server, "relay-agent": agent}


def test_not_options_are_what_they_say() -> None:
    from relay_server import tokens

    assert tokens.SECRET_ENV == "RELAY_SECRET"
    caddyfile = (DEPLOY / "Caddyfile").read_text()
    assert "{$RELAY_DOMAIN}" in caddyfile and "{$RELAY_UPSTREAM:" in caddyfile
    assert 'os.environ.get("RELAY_MYPYC") == "1"' in (ROOT / "setup.py").read_text()


def test_every_relay_variable_exists() -> None:
    known = set(NOT_OPTIONS)
    for cli in _clis().values():
        for _, command in _commands(cli):
            for param in command.params:
                envvars = param.envvar if isinstance(param.envvar, list | tuple) else [param.envvar]
                known.update(name for name in envvars if name)
    missing = {}
    for path in DOCUMENTED:
        text = path.read_text()
        assert str(ROOT) not in text, f"{path.name} names this machine's checkout"
        for name in sorted(set(re.findall(r"\bRELAY_[A-Z0-9_]*[A-Z0-9]\b", text)) - known):
            missing.setdefault(name, []).append(str(path.relative_to(ROOT)))
    assert not missing, "RELAY_* variables no command reads: " + "; ".join(
        f"{name} (in {', '.join(files)})" for name, files in missing.items()
    )


#: A token that ends a command line in prose or shell: code spans, pipes, subshells,
#: quotes, comments.
_END = re.compile(r"[`|;()#'\"]|&&")


def _command_lines(text: str) -> Iterator[tuple[str, list[str]]]:
    """(program, tokens after it) for each ``relay-server ...``/``relay-agent ...`` in
    ``text``, shell continuations joined, up to the first token that ends a command."""
    text = re.sub(r"\\\n", " ", text)
    for line in text.splitlines():
        # Not a unit name (journalctl -u relay-server -f).
        for match in re.finditer(r"(?<![\w.-])(?<!-u )(relay-server|relay-agent)(?=[ \t])", line):
            words = []
            for word in line[match.end() :].split():
                if _END.search(word):
                    if word.startswith("-"):
                        words.append(_END.split(word)[0])
                    break
                words.append(word)
            yield match.group(1), words


def test_every_option_exists() -> None:
    clis = _clis()
    missing: dict[str, set[str]] = {}
    checked = 0
    for path in DOCUMENTED:
        for program, words in _command_lines(path.read_text()):
            command, names = clis[program], [program]
            for index, word in enumerate(words):
                if isinstance(command, click.Group) and word in command.commands:
                    command = command.commands[word]
                    names.append(word)
                    continue
                if not word.startswith("-"):
                    if isinstance(command, click.Group) and index == len(names) - 1:
                        break  # prose ("relay-server runs as a service"), not a command
                    continue  # an argument or an option's value
                option = word.split("=")[0]
                options = {opt for param in command.params for opt in param.opts + param.secondary_opts}
                checked += 1
                if option not in options | {"--help", "-h"}:
                    missing.setdefault(" ".join(names), set()).add(f"{option} ({path.relative_to(ROOT)})")
    assert checked > 10, f"only {checked} options found: the command reader is broken"
    assert not missing, "options these commands do not have: " + "; ".join(
        f"{command}: {', '.join(sorted(options))}" for command, options in sorted(missing.items())
    )
