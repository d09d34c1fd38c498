"""A small end-to-end framework, after frp's: real processes, free ports, a mock upstream.

``Relay`` starts the real console scripts (``relay-server``, ``relay-agent``) found next to
the running interpreter, each with its own temp data dir and config dir, on ports picked
free on 127.0.0.1, and kills them by PID in ``close()``. ``TargetService`` is the local
service an agent forwards to: an aiohttp app on its own thread and loop (so fixtures of any
scope may share it) that records every request it gets byte for byte. Readiness is always
polled (``/healthz``, the agent's ``Forwarding`` lines), never slept for.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import gzip
import hashlib
import http.client
import json
import os
import pty
import random
import re
import signal
import socket
import ssl
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import AsyncIterable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

BIN = Path(sys.executable).parent
RELAY_SERVER = BIN / "relay-server"
RELAY_AGENT = BIN / "relay-agent"

#: Seconds a process gets to become ready (listening, or printing its URLs). Far above
#: the ~0.5 s they need, so a loaded CI machine does not fail the suite.
READY_TIMEOUT = 20.0
#: Seconds a refused agent gets to print its reason and exit.
EXIT_TIMEOUT = 20.0

FORWARDING = re.compile(r"^Forwarding (\S+) -> (\S+)$")
INSPECT = re.compile(r"^Inspect    (http://\S+)$")
REQUEST_LINE = r"^\d\d:\d\d:\d\d {method}\s+{path} {status} \d+ms(?: .+)?$"


#: Ports for servers are handed out from a block of this process's own, below the kernel's
#: ephemeral range (``ip_local_port_range``, 32768-60999 by default): a port the kernel picks
#: for an outgoing connection or a ``bind(0)`` never lands there, and each pytest-xdist worker
#: has a block of its own, so two workers never hand out the same port, with no state shared.
PORT_BASE = 20000
PORT_BLOCK = 1000
#: Set by a test that runs suites in a pytest of its own (tests/deploy/test_compiled_build.py
#: ``run_suites``): that pytest, which inherits its worker's ``gwN``, takes block ``FROM + N``,
#: past the blocks of the run that started it.
PORT_BLOCKS_FROM = "RELAY_TEST_PORT_BLOCKS_FROM"


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; elsewhere only a bound for the blocks


def _worker_block() -> range:
    """This process's ports: block N for xdist worker ``gwN`` (block 0 without xdist),
    shifted by ``PORT_BLOCKS_FROM``."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0
    index += int(os.environ.get(PORT_BLOCKS_FROM, "0"))
    blocks = max(1, (_ephemeral_low() - PORT_BASE) // PORT_BLOCK)
    start = PORT_BASE + PORT_BLOCK * (index % blocks)
    return range(start, start + PORT_BLOCK)


class _PortCursor:
    """Walks this process's block once round before it comes back to a port, so a port
    handed out earlier (a server stopped to be restarted on it) is not handed out again."""

    def __init__(self) -> None:
        self.block = _worker_block()
        # A random start: two test sessions on one machine (each with its worker gw0)
        # then rarely walk the same ports at the same time.
        self.next = random.randrange(len(self.block))

    def take(self) -> int:
        for _ in range(len(self.block)):
            port = self.block[self.next % len(self.block)]
            self.next += 1
            if _bindable(port):
                return port
        raise RuntimeError(f"no free port left in {self.block}")


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


_ports = _PortCursor()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, from this process's own block (see
    ``PORT_BASE``), never one this process has handed out before in the same round."""
    return _ports.take()


def in_ci() -> bool:
    """True in CI (``CI`` set), where a missing tool (caddy, chromium) fails its tests
    instead of skipping them."""
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy; raise naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


async def until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """``wait_until`` for async tests; ``predicate`` may be a coroutine function."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


# -- processes -------------------------------------------------------------------------------


class Process:
    """A console script run as a subprocess; two threads collect its stdout and stderr lines."""

    def __init__(self, argv: list[str], env: Mapping[str, str], label: str) -> None:
        self.argv = argv
        self.label = label
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self._changed = threading.Condition()
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env),
        )
        self.pid = self.popen.pid
        self._readers = [
            threading.Thread(target=self._pump, args=(self.popen.stdout, self.stdout_lines), daemon=True),
            threading.Thread(target=self._pump, args=(self.popen.stderr, self.stderr_lines), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _pump(self, stream: Any, lines: list[str]) -> None:
        for raw in iter(stream.readline, b""):
            with self._changed:
                lines.append(raw.decode("utf-8", "replace").rstrip("\r\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def stdout(self) -> str:
        return "\n".join(self.stdout_lines)

    @property
    def stderr(self) -> str:
        return "\n".join(self.stderr_lines)

    def running(self) -> bool:
        return self.popen.poll() is None

    def describe(self) -> str:
        return (
            f"{self.label} (pid {self.pid}, exit {self.popen.poll()}):\n"
            f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"
        )

    def wait_for_line(
        self, pattern: str, *, stream: str = "stdout", count: int = 1, timeout: float = READY_TIMEOUT
    ) -> list[re.Match[str]]:
        """Block until ``count`` lines of ``stream`` match ``pattern``; raise if the process
        exits first or ``timeout`` runs out."""
        regex = re.compile(pattern)
        lines = self.stdout_lines if stream == "stdout" else self.stderr_lines
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                matches = [m for line in lines if (m := regex.search(line))]
                if len(matches) >= count:
                    return matches[:count]
                if not self.running() and all(not r.is_alive() for r in self._readers):
                    raise AssertionError(f"{pattern!r} never appeared on {stream}; {self.describe()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{pattern!r} not on {stream} within {timeout}s; {self.describe()}")
                self._changed.wait(min(left, 0.1))

    async def line(
        self, pattern: str, *, stream: str = "stdout", count: int = 1, timeout: float = READY_TIMEOUT
    ) -> list[re.Match[str]]:
        return await asyncio.to_thread(
            self.wait_for_line, pattern, stream=stream, count=count, timeout=timeout
        )

    def wait(self, timeout: float = EXIT_TIMEOUT) -> int:
        """The exit code, once the process has exited and its output is read to the end."""
        code = self.popen.wait(timeout)
        for reader in self._readers:
            reader.join(timeout)
        return code

    async def exited(self, timeout: float = EXIT_TIMEOUT) -> int:
        return await asyncio.to_thread(self.wait, timeout)

    def send(self, sig: int) -> None:
        if self.running():
            os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL by PID and reap; safe to call twice."""
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.wait(10)
        for pipe in (self.popen.stdout, self.popen.stderr):
            if pipe is not None:
                pipe.close()


class RelayServer:
    """One ``relay-server serve`` process on 127.0.0.1 with its own data dir."""

    def __init__(
        self, relay: Relay, data_dir: Path, port: int, extra: Iterable[str], tls: ssl.SSLContext | None = None
    ) -> None:
        self.relay = relay
        self.data_dir = data_dir
        self.port = port
        self.extra = list(extra)
        self.apex = f"localhost:{port}"
        #: Given for a server started with --tls-cert/--tls-key: verifies its certificate.
        self.tls = tls
        self.public_url = f"{'https' if tls else 'http'}://localhost:{port}"
        self.process: Process | None = None

    def start(self) -> RelayServer:
        """Start the process and wait until ``GET /healthz`` answers 200."""
        argv = [
            str(RELAY_SERVER),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
            "--public-url",
            self.public_url,
            *self.extra,
        ]
        self.process = self.relay.spawn(argv, f"relay-server :{self.port}")
        process = self.process
        wait_until(lambda: self._healthy(process), READY_TIMEOUT, f"{process.label} /healthz")
        return self

    def _healthy(self, process: Process) -> bool:
        if not process.running():
            raise AssertionError(f"relay-server exited before it was ready; {process.describe()}")
        conn = (
            http.client.HTTPSConnection("localhost", self.port, timeout=2, context=self.tls)
            if self.tls is not None
            else http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
        )
        try:
            conn.request("GET", "/healthz", headers={"Host": self.apex})
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Signal the server and return its exit code."""
        assert self.process is not None
        self.process.send(sig)
        return self.process.wait(timeout)

    def kill(self) -> int:
        """SIGKILL the server (a power cut, as far as the store can tell); its exit code."""
        assert self.process is not None
        self.process.kill()
        return self.process.wait()

    def restarted(self) -> RelayServer:
        """A new started server on the same port, data dir and options (stop this one first)."""
        return self.relay.server(*self.extra, port=self.port, data_dir=self.data_dir, tls=self.tls)

    # -- the admin commands, run on the same data dir --------------------------------------

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(RELAY_SERVER), *args, "--data-dir", str(self.data_dir)],
            env=self.relay.env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    def token(self, user: str, *names: str, expires: str | None = None) -> str:
        args = ["token", "create", user]
        for name in names:
            args += ["--name", name]
        if expires is not None:
            args += ["--expires", expires]
        result = self.cli(*args)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert len(lines) == 1, f"token create printed more than the token: {result.stdout!r}"
        return lines[0]

    def token_rows(self) -> list[dict[str, str]]:
        """``token list`` as dicts keyed by its header (ID, USER, NAMES, EXPIRES, STATUS)."""
        result = self.cli("token", "list")
        assert result.returncode == 0, result.stderr
        header, *rows = result.stdout.splitlines()
        keys = header.split()
        return [dict(zip(keys, re.split(r"\s{2,}", row.strip()), strict=True)) for row in rows]

    # -- URLs ------------------------------------------------------------------------------

    def url(self, path: str) -> URL:
        """The URL a client dials for ``path``: always 127.0.0.1, the Host header routes."""
        return URL(f"http://127.0.0.1:{self.port}{path}", encoded=True)


class Agent:
    """One ``relay-agent connect`` process."""

    def __init__(self, process: Process) -> None:
        self.process = process

    def ready(self, count: int = 2) -> list[tuple[str, str]]:
        """Wait for the ``Forwarding`` lines; returns (public URL, target URL) pairs."""
        matches = self.process.wait_for_line(FORWARDING.pattern, count=count)
        return [(m.group(1), m.group(2)) for m in matches]

    def forwarding(self) -> list[str]:
        return [line for line in self.process.stdout_lines if FORWARDING.match(line)]

    def inspector(self) -> str:
        """The inspector's URL, from the ``Inspect`` line (waited for)."""
        return self.process.wait_for_line(INSPECT.pattern)[0].group(1)


@dataclass
class Tunnel:
    """A server, a target and the agent joining them under one name."""

    server: RelayServer
    target: TargetService
    agent: Agent
    name: str
    token: str

    def url(self, form: str, path: str) -> tuple[URL, dict[str, str]]:
        """URL and Host header for ``path`` in ``form`` ("subdomain" or "path")."""
        if form == "subdomain":
            return self.server.url(path), {"Host": f"{self.name}.{self.server.apex}"}
        if form == "path":
            return self.server.url(f"/t/{self.name}{path}"), {"Host": self.server.apex}
        raise ValueError(form)

    def host(self, form: str) -> str:
        return f"{self.name}.{self.server.apex}" if form == "subdomain" else self.server.apex

    def raw_target(self, form: str, path: str) -> str:
        return path if form == "subdomain" else f"/t/{self.name}{path}"


class Relay:
    """Starts servers, agents and targets under one temp dir; ``close()`` kills them all."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.processes: list[Process | Terminal] = []
        self.targets: list[TargetService] = []
        config = base / "xdg-config"
        config.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        for proxy in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
            env.pop(proxy, None)
            env.pop(proxy.upper(), None)
        env["XDG_CONFIG_HOME"] = str(config)  # never the user's saved `relay-agent login`
        env["PYTHONUNBUFFERED"] = "1"  # lines reach the pipe when printed, as on a terminal
        self.env = env
        self._dirs = 0

    def spawn(self, argv: list[str], label: str, env: Mapping[str, str] | None = None) -> Process:
        """Start ``argv`` with the suite's environment (plus ``env``); killed in ``close()``.

        A ``relay-agent connect`` serves its inspector (and so records every request, as
        by default) on a port of this worker's block (``RELAY_INSPECT``), never on the
        machine's shared 4040; ``--inspect ADDR`` or ``--no-inspect`` in ``argv`` win."""
        if argv[:2] == [str(RELAY_AGENT), "connect"] and "RELAY_INSPECT" not in (env or {}):
            env = {**(env or {}), "RELAY_INSPECT": f"127.0.0.1:{free_port()}"}
        process = Process(argv, {**self.env, **(env or {})}, label)
        self.processes.append(process)
        return process

    def terminal(self, argv: list[str], label: str) -> Terminal:
        """Start ``argv`` on a pseudo-terminal with the suite's environment; killed in ``close()``."""
        terminal = Terminal(argv, self.env, label)
        self.processes.append(terminal)
        return terminal

    def new_dir(self, prefix: str) -> Path:
        self._dirs += 1
        path = self.base / f"{prefix}-{self._dirs}"
        path.mkdir(parents=True)
        return path

    def server(
        self,
        *extra: str,
        port: int | None = None,
        data_dir: Path | None = None,
        start: bool = True,
        tls: ssl.SSLContext | None = None,
    ) -> RelayServer:
        """A started server (``extra`` are more ``serve`` options, e.g. ``--timeout 1``);
        with ``start=False`` only its data dir, for the admin commands. ``tls``: it serves
        HTTPS (``extra`` has --tls-cert/--tls-key), verified with this client context."""
        server = RelayServer(self, data_dir or self.new_dir("data"), port or free_port(), extra, tls)
        return server.start() if start else server

    def target(self, label: str = "target", kind: type[TargetService] | None = None) -> TargetService:
        """A started target (``kind``: a subclass with its own answers); stopped in ``close()``."""
        target = (kind or TargetService)(label)
        target.start()
        self.targets.append(target)
        return target

    def agent(
        self,
        server: RelayServer,
        token: str,
        forward: str,
        *names: str,
        ready: bool = True,
        extra: Iterable[str] = (),
        server_url: str | None = None,
    ) -> Agent:
        """A ``relay-agent connect`` (``extra``: more options); waits for its URLs if ``ready``.

        ``server_url`` replaces the server's public URL as ``--server`` (e.g. a proxy in between).
        """
        argv = [
            str(RELAY_AGENT),
            "connect",
            "--server",
            server_url or server.public_url,
            "--token",
            token,
            "--forward",
            forward,
        ]
        for name in names:
            argv += ["--name", name]
        argv += extra
        agent = Agent(self.spawn(argv, f"relay-agent {' '.join(names) or '(default name)'}"))
        if ready:
            agent.ready(2 * max(1, len(names)))
        return agent

    def agent_cli(self, server: RelayServer, token: str, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``relay-agent ARGS --server URL --token TOKEN`` (the ``tunnel`` and ``events``
        commands) to completion; the caller checks its exit code and output."""
        return subprocess.run(
            [str(RELAY_AGENT), *args, "--server", server.public_url, "--token", token],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def refused_agent(
        self, server: RelayServer, token: str, forward: str = "127.0.0.1:9", *names: str
    ) -> tuple[int, Process]:
        """Run an agent the server should refuse: its exit code and process (for output)."""
        agent = self.agent(server, token, forward, *names, ready=False)
        code = agent.process.wait(EXIT_TIMEOUT)
        return code, agent.process

    def tunnel(
        self,
        server: RelayServer | None = None,
        user: str = "alice",
        name: str | None = None,
        target: TargetService | None = None,
        token: str | None = None,
        agent_extra: Iterable[str] = (),
    ) -> Tunnel:
        """A server (new unless given), a target and an agent; ``agent_extra`` are more
        ``connect`` options, e.g. ``("--mode", "live")``."""
        server = server or self.server()
        target = target or self.target(name or user)
        token = token or server.token(user)
        agent = self.agent(
            server, token, f"127.0.0.1:{target.port}", *([name] if name else []), extra=agent_extra
        )
        return Tunnel(server, target, agent, name or user, token)

    def close(self) -> None:
        for process in self.processes:
            process.kill()
        for target in self.targets:
            target.stop()


class Terminal:
    """A console script run on a pseudo-terminal (stdout, stderr and stdin), as in a
    shell: what it draws is read by a thread, and ``text()`` is it without escape codes."""

    #: Rows and columns of the terminal.
    SIZE = (40, 140)
    _ESCAPES = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|\][^\x07]*\x07|[()][A-Z0-9]|[=>])")

    def __init__(self, argv: list[str], env: Mapping[str, str], label: str) -> None:
        self.label = label
        self._master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", *self.SIZE, 0, 0))
        env = {**env, "TERM": "xterm-256color"}
        self.popen = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
        os.close(slave)
        self.pid = self.popen.pid
        self._raw = bytearray()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self._master, 65536)
            except OSError:  # EIO: the process closed the terminal
                return
            if not data:
                return
            with self._lock:
                self._raw += data

    def text(self) -> str:
        with self._lock:
            raw = bytes(self._raw)
        return self._ESCAPES.sub("", raw.decode("utf-8", "replace"))

    def wait_for(self, pattern: str, timeout: float = READY_TIMEOUT) -> re.Match[str]:
        """The first match of ``pattern`` in what was drawn, once it appears."""
        regex = re.compile(pattern)
        what = f"{pattern!r} on {self.label}'s terminal"
        return wait_until(lambda: regex.search(self.text()), timeout, what)

    def kill(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)
        self._reader.join(5)
        with contextlib.suppress(OSError):
            os.close(self._master)


# -- the local target service ---------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    """One request as the target received it."""

    method: str
    raw_path: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.getall(name)
        return values[0] if values else None

    def getall(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


#: Response headers the /hop endpoint sends: the first group is hop-by-hop, the last
#: one is end-to-end and must reach the client.
HOP_RESPONSE_HEADERS = (
    ("Connection", "X-Hop-Secret"),
    ("X-Hop-Secret", "listed-in-connection"),
    ("Keep-Alive", "timeout=99"),
    ("Proxy-Authenticate", "Basic realm=target"),
    ("Proxy-Foo", "bar"),
    ("Trailer", "X-Checksum"),
    ("X-End-To-End", "kept"),
)

SET_COOKIES = (
    "a=1; Path=/",
    "b=2; Expires=Wed, 21 Oct 2026 07:28:00 GMT; HttpOnly",
    "c=3",
    "a=4; Path=/again",
)

SIZED_BODY = b"0123456789" * 123 + b"abcd"  # 1234 bytes


@dataclass
class TargetService:
    """The local service behind an agent. Every path not listed below echoes the request
    as JSON (method, raw path with query, headers in order, body as base64)::

        /bin           the request body, raw            /cookies    four Set-Cookie, two X-Multi
        /slow?seconds  sleeps, then "slept"             /sized      1234 bytes (HEAD: none)
        /status/CODE   that status                      /redirect   302 to /elsewhere
        /hop           hop-by-hop response headers      /gzip       a gzip body, not decoded
        /digest        length and sha256 of the body    /hold?key   waits for release(key), "released"

    Each response carries ``X-Target: <label>`` so tests can tell two targets apart.
    """

    label: str
    requests: list[Seen] = field(default_factory=list)
    port: int = 0
    _gates: dict[str, asyncio.Event] = field(default_factory=dict)

    def start(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

    async def _start(self) -> None:
        app = web.Application(
            client_max_size=64 * 1024 * 1024,
            handler_args={
                "auto_decompress": False,  # see exactly the bytes the relay delivered
                "max_line_size": 128 * 1024,
                "max_field_size": 128 * 1024,
            },
        )
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    def stop(self) -> None:
        if self._loop.is_closed():
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    @property
    def forward(self) -> str:
        return f"127.0.0.1:{self.port}"

    def seen(self, path_prefix: str) -> list[Seen]:
        return [r for r in self.requests if r.raw_path.startswith(path_prefix)]

    def release(self, key: str) -> None:
        """Let every ``/hold?key=KEY`` request answer, and those still to come."""
        self._loop.call_soon_threadsafe(lambda: self._gate(key).set())

    def _gate(self, key: str) -> asyncio.Event:
        return self._gates.setdefault(key, asyncio.Event())

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        seen = Seen(
            request.method,
            request.raw_path,
            tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers),
            body,
        )
        self.requests.append(seen)
        response = await self._respond(request, seen)
        response.headers["X-Target"] = self.label
        return response

    async def _respond(self, request: web.Request, seen: Seen) -> web.StreamResponse:
        path = request.path
        if path == "/bin":
            return web.Response(body=seen.body, content_type="application/octet-stream")
        if path == "/digest":
            digest = hashlib.sha256(seen.body).hexdigest()
            return web.json_response({"length": len(seen.body), "sha256": digest})
        if path == "/cookies":
            headers: CIMultiDict[str] = CIMultiDict()
            for cookie in SET_COOKIES:
                headers.add("Set-Cookie", cookie)
            headers.add("X-Multi", "one")
            headers.add("X-Other", "between")
            headers.add("X-Multi", "two")
            return web.Response(text="cookies", headers=headers)
        if path == "/slow":
            seconds = float(request.query.get("seconds", "1"))
            await asyncio.sleep(seconds)
            return web.Response(text=f"slept {seconds:g}")
        if path == "/hold":
            await self._gate(request.query.get("key", "")).wait()
            return web.Response(text="released")
        if path == "/sized":
            return web.Response(body=SIZED_BODY, content_type="text/plain")
        if path.startswith("/status/"):
            status = int(path.rsplit("/", 1)[1])
            text = None if status in (204, 304) else f"target says {status}"
            return web.Response(status=status, text=text)
        if path == "/redirect":
            return web.Response(status=302, headers={"Location": "/elsewhere?from=redirect"})
        if path == "/hop":
            headers = CIMultiDict()
            for name, value in HOP_RESPONSE_HEADERS:
                headers.add(name, value)
            return web.Response(text="hop", headers=headers)
        if path == "/gzip":
            return web.Response(
                body=gzip.compress(b"compressed at the target " * 100, mtime=0),
                headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"},
            )
        return web.json_response(
            {
                "target": self.label,
                "method": seen.method,
                "path": seen.raw_path,
                "headers": [list(h) for h in seen.headers],
                "body": base64.b64encode(seen.body).decode(),
            }
        )


# -- clients -----------------------------------------------------------------------------------


@dataclass
class Reply:
    """What a client saw: status, headers in wire order, body bytes."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.getall(name)
        return values[0] if values else None

    def getall(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def relay_error(self) -> str | None:
        return self.header("X-Relay-Error")


def client_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        auto_decompress=False,
        timeout=aiohttp.ClientTimeout(total=60),
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent",),
    )


async def fetch(
    http: aiohttp.ClientSession,
    method: str,
    url: URL,
    host: str,
    *,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes | AsyncIterable[bytes] | None = None,
) -> Reply:
    """One request; ``body`` may be an async iterable (sent chunked, no Content-Length)."""
    all_headers: CIMultiDict[str] = CIMultiDict([("Host", host), *headers])
    async with http.request(method, url, headers=all_headers, data=body, allow_redirects=False) as resp:
        data = await resp.read()
        raw = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in resp.raw_headers]
        return Reply(resp.status, raw, data)


async def through(
    http: aiohttp.ClientSession,
    tunnel: Tunnel,
    form: str,
    method: str,
    path: str,
    *,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes | None = None,
) -> Reply:
    """One request to ``path`` through ``tunnel``'s public URL in ``form``."""
    url, host = tunnel.url(form, path)
    return await fetch(http, method, url, host["Host"], headers=headers, body=body)


def send(
    tunnel: Tunnel,
    method: str,
    path: str,
    *,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes | None = None,
    form: str = "path",
) -> Reply:
    """``through`` for tests without an event loop (a browser's): one request to ``path``
    through ``tunnel``'s public URL in ``form``, on a fresh connection."""
    url, host = tunnel.url(form, path)
    conn = http.client.HTTPConnection("127.0.0.1", tunnel.server.port, timeout=60)
    try:
        conn.putrequest(method, url.raw_path_qs, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host["Host"])
        for name, value in headers:
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        return Reply(response.status, list(response.getheaders()), response.read())
    finally:
        conn.close()


async def api(
    http: aiohttp.ClientSession,
    server: RelayServer,
    token: str,
    method: str,
    path: str,
    body: Any = None,
) -> Reply:
    """One call of the server's JSON API: ``path`` is relative to ``/_relay/api/``."""
    headers = [("Authorization", f"Bearer {token}")]
    data = None
    if body is not None:
        headers.append(("Content-Type", "application/json"))
        data = json.dumps(body).encode()
    return await fetch(
        http, method, server.url("/_relay/api/" + path), server.apex, headers=headers, body=data
    )


async def raw_exchange(port: int, request: bytes, *, timeout: float = 10.0) -> tuple[Reply, bytes]:
    """Send ``request`` bytes as they are on a fresh connection, read one response.

    Returns the parsed response and whatever else arrived until the server closed
    (send ``Connection: close``), so a test can see a body that should not be there.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(timeout):
            head = await reader.readuntil(b"\r\n\r\n")
            status_line, *lines = head[:-4].decode("latin-1").split("\r\n")
            status = int(status_line.split(" ", 2)[1])
            headers = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines)]
            reply = Reply(status, headers, b"")
            is_head = request.split(b" ", 1)[0] == b"HEAD"
            if is_head or status in (204, 304) or status < 200:
                pass
            elif (length := reply.header("Content-Length")) is not None:
                reply.body = await reader.readexactly(int(length))
            elif "chunked" in (reply.header("Transfer-Encoding") or "").lower():
                reply.body = await _read_chunked(reader)
            else:
                reply.body = await reader.read()
                return reply, b""
            try:
                rest = await reader.read()
            except ConnectionResetError:
                rest = b""
            return reply, rest
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return bytes(body)
        body += await reader.readexactly(size)
        await reader.readexactly(2)


async def raw_through(
    tunnel: Tunnel,
    form: str,
    method: str,
    path: str,
    *,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
) -> tuple[Reply, bytes]:
    """``through`` on a raw socket: the request line carries ``path`` exactly as given."""
    lines = [f"{method} {tunnel.raw_target(form, path)} HTTP/1.1", f"Host: {tunnel.host(form)}"]
    lines += [f"{k}: {v}" for k, v in headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    return await raw_exchange(tunnel.server.port, request)
