"""Everything the bench starts: the target app, relay-server, relay-agent, helpers.

Each child runs with its output in a log file under the run's temp dir, is known by its
PID, and is stopped by that PID (SIGTERM, then SIGKILL after a grace period) when its
scenario ends and again, for any left, when the run ends (also on Ctrl-C or an error).
Each is also started with PR_SET_PDEATHSIG, so a bench killed outright takes its
children with it. Readiness is always polled (``/healthz``, the server's status
document), never slept for. Every port is picked free on 127.0.0.1 by the kernel.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

REPO_ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RELAY_SERVER = BIN / "relay-server"
RELAY_AGENT = BIN / "relay-agent"
TARGET_JS = Path(__file__).resolve().parent / "target.js"

#: Seconds a process gets to become ready before the run is abandoned: far above the
#: second they need, as other test suites may be loading the machine.
READY_TIMEOUT = 30.0
#: Seconds after SIGTERM before SIGKILL. relay-server drains for up to 10 s.
STOP_GRACE = 15.0
#: Seconds a one-shot command (token create, a version query) may take.
COMMAND_TIMEOUT = 30.0

_PR_SET_PDEATHSIG = 1
try:
    _libc: Any = ctypes.CDLL(None, use_errno=True)
except OSError:  # not glibc: children are still stopped by PID, just not if we are SIGKILLed
    _libc = None


class RunFailed(Exception):
    """The run cannot go on: a process died, never became ready, or a tool is missing."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, from the kernel's ephemeral range."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def raise_nofile() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


def _child_setup(nofile: int | None) -> Callable[[], None]:
    def setup() -> None:  # runs in the child between fork and exec: no allocation-heavy work
        if _libc is not None:
            _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if nofile is not None:
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            limit = nofile if hard == resource.RLIM_INFINITY else min(nofile, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))

    return setup


@dataclass
class Child:
    label: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def describe(self) -> str:
        return f"{self.label} (pid {self.pid}, exit {self.popen.poll()}), log {self.log}:\n{self.tail()}"


@dataclass
class Finished:
    """A command run to its end: exit code, output, and the CPU it used (from wait4)."""

    returncode: int
    stdout: str
    cpu_seconds: float
    wall_seconds: float


@dataclass
class Processes:
    """What the run started, under ``base``; each child is stopped by its PID."""

    base: Path
    env: dict[str, str] = field(default_factory=dict)
    children: list[Child] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.logs = self.base / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        if not self.env:
            self.env = clean_env(self.base)
        self._count = 0

    def _log_path(self, label: str) -> Path:
        self._count += 1
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
        return self.logs / f"{self._count:04d}-{safe}.log"

    def start(
        self,
        label: str,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        nofile: int | None = None,
        stdin: int | None = subprocess.DEVNULL,
        stdout: int | None = None,
    ) -> Child:
        """Start ``argv``; its output goes to a log file (stdout to a pipe if ``stdout=PIPE``)."""
        log = self._log_path(label)
        with log.open("wb") as out:
            popen = subprocess.Popen(
                argv,
                stdin=stdin,
                stdout=out if stdout is None else stdout,
                stderr=out,
                env={**self.env, **(env or {})},
                cwd=REPO_ROOT,
                preexec_fn=_child_setup(nofile),
            )
        child = Child(label, popen, log)
        self.children.append(child)
        return child

    def check_running(self, children: Iterable[Child] | None = None) -> None:
        for child in self.children if children is None else children:
            if not child.running():
                raise RunFailed(f"{child.label} exited unexpectedly: {child.describe()}")

    async def run_to_end(self, label: str, argv: list[str], timeout: float) -> Finished:
        """Run ``argv`` to its end (killed after ``timeout`` s); its CPU comes from wait4,
        so a load generator's own cost is known exactly."""
        log = self._log_path(label)
        started = time.monotonic()
        with log.open("wb") as out:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=REPO_ROOT,
                preexec_fn=_child_setup(None),
            )
        child = Child(label, popen, log)
        self.children.append(child)
        try:
            while True:
                pid, status, usage = os.wait4(popen.pid, os.WNOHANG)
                if pid:
                    popen.returncode = os.waitstatus_to_exitcode(status)
                    break
                if time.monotonic() - started > timeout:
                    raise RunFailed(f"{label} did not finish within {timeout:g} s: {child.describe()}")
                await asyncio.sleep(0.02)
        finally:
            if popen.returncode is None:  # timed out, or the run was interrupted
                with contextlib.suppress(ProcessLookupError):
                    os.kill(popen.pid, signal.SIGKILL)
                _, status, usage = os.wait4(popen.pid, 0)
                popen.returncode = os.waitstatus_to_exitcode(status)
            self.children.remove(child)
        return Finished(
            popen.returncode,
            log.read_text(errors="replace"),
            usage.ru_utime + usage.ru_stime,
            time.monotonic() - started,
        )

    async def stop(self, children: Iterable[Child]) -> None:
        """SIGTERM each, then SIGKILL those still there after ``STOP_GRACE``; never raises."""
        children = [c for c in children if c in self.children]
        for child in children:
            if child.running():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        while any(c.running() for c in children) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for child in children:
            self._kill(child)

    def stop_all(self) -> None:
        """The synchronous last resort (the run ended, or was interrupted)."""
        for child in self.children:
            if child.running():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        while any(c.running() for c in self.children) and time.monotonic() < deadline:
            time.sleep(0.05)
        for child in list(self.children):
            self._kill(child)

    def _kill(self, child: Child) -> None:
        if child.running():
            print(f"  {child.label} (pid {child.pid}) ignored SIGTERM: SIGKILL", file=sys.stderr)
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.popen.wait(10)
        for pipe in (child.popen.stdin, child.popen.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        self.children.remove(child)


def clean_env(base: Path) -> dict[str, str]:
    """The environment of every child: no RELAY_* settings, no proxies, no saved login."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_") and "proxy" not in k.lower()}
    env["XDG_CONFIG_HOME"] = str(base / "xdg-config")  # never the user's `relay-agent login`
    env["PYTHONUNBUFFERED"] = "1"
    return env


async def wait_until(
    check: Callable[[], Awaitable[Any]],
    what: str,
    processes: Processes,
    watch: Iterable[Child] = (),
    timeout: float = READY_TIMEOUT,
    interval: float = 0.05,
) -> Any:
    """Poll ``check`` until it returns something truthy; fail if a ``watch``ed child exits
    or ``timeout`` runs out. Connection errors count as "not yet"."""
    watch = list(watch)
    deadline = time.monotonic() + timeout
    while True:
        processes.check_running(watch)
        with contextlib.suppress(TimeoutError, aiohttp.ClientError, OSError):
            value = await check()
            if value:
                return value
        if time.monotonic() > deadline:
            raise RunFailed(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)


def http_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=30),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
    )


# -- the target app ------------------------------------------------------------------------


@dataclass
class Target:
    """The local service agents forward to (and the direct baseline is measured against)::

    GET  /healthz            "ok"
    POST /upload             reads the body, discards it, answers {"length": N}
    GET  /download?bytes=N   N bytes, streamed in 64 KiB chunks, with Content-Length
    *    anything else       reads the body, answers {"ok":true} (a small JSON)
    """

    kind: str  # "node" or "aiohttp"
    version: str
    port: int
    child: Child

    @property
    def forward(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def events(self, http: aiohttp.ClientSession) -> int:
        """Distinct webhooks (X-Relay-Event-Id) the target has seen."""
        async with http.get(self.url("/counts")) as resp:
            resp.raise_for_status()
            return int((await resp.json())["events"])


def node_version() -> str | None:
    node = shutil.which("node")
    if node is None:
        return None
    try:
        out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


async def start_target(processes: Processes, http: aiohttp.ClientSession, prefer: str) -> Target:
    """A node target when node is installed (``prefer`` "auto" or "node"), else aiohttp."""
    port = free_port()
    version = node_version() if prefer in ("auto", "node") else None
    if prefer == "node" and version is None:
        raise RunFailed("--target node: node is not installed (apt-get install nodejs)")
    if version is not None:
        child = processes.start("target-node", [shutil.which("node") or "node", str(TARGET_JS), str(port)])
        target = Target("node", f"node {version}", port, child)
    else:
        child = processes.start("target-aiohttp", [sys.executable, "-m", "bench.target_app", str(port)])
        target = Target("aiohttp", f"aiohttp {aiohttp.__version__}", port, child)

    async def up() -> bool:
        async with http.get(target.url("/healthz")) as resp:
            return resp.status == 200

    await wait_until(up, f"the {target.kind} target", processes, [child])
    return target


@dataclass
class Floor:
    """``bench.floor``: the least a Python relay does, as a server and its agent."""

    port: int
    server: Child
    agent: Child

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def children(self) -> list[Child]:
        return [self.server, self.agent]


async def start_floor(processes: Processes, http: aiohttp.ClientSession, target: Target) -> Floor:
    """The floor relay's server and agent, ready when a request reaches the target through them."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"

    def answering(*statuses: int) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            async with http.get(f"{base}/healthz") as resp:
                return resp.status in statuses

        return check

    server = processes.start("floor-server", [sys.executable, "-m", "bench.floor", "server", str(port)])
    # 503 until its agent is connected
    await wait_until(answering(200, 503), "the floor relay's server", processes, [server])
    argv = [sys.executable, "-m", "bench.floor", "agent", str(port), str(target.port)]
    floor = Floor(port, server, processes.start("floor-agent", argv))
    await wait_until(answering(200), "the floor relay's agent", processes, floor.children)
    return floor


# -- relay-server and relay-agent ------------------------------------------------------------


@dataclass
class RelayServer:
    label: str
    port: int
    data_dir: Path
    child: Child

    @property
    def pid(self) -> int:
        return self.child.pid

    @property
    def apex(self) -> str:
        return f"localhost:{self.port}"

    @property
    def public_url(self) -> str:
        return f"http://localhost:{self.port}"

    def host(self, name: str) -> str:
        """The Host header of tunnel ``name``'s subdomain URL."""
        return f"{name}.{self.apex}"

    @property
    def base(self) -> str:
        """What a client dials: always 127.0.0.1; the Host header routes."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def agent_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/_relay/agent"


def check_installed() -> str:
    """Which build of relay this venv runs (``relay-server --version``: "plain Python" or
    "compiled with mypyc"). Raises ``RunFailed`` if it is not installed."""
    for script in (RELAY_SERVER, RELAY_AGENT):
        if not script.exists():
            raise RunFailed(f"{script} is missing: run `make lint` (or pip install -e .) in this venv")
    version = subprocess.run(
        [str(RELAY_SERVER), "--version"], capture_output=True, text=True, timeout=COMMAND_TIMEOUT
    ).stdout
    return version.rstrip().rpartition("(")[2].rstrip(")") or "?"


def create_token(processes: Processes, data_dir: Path, user: str, names: Iterable[str] = ()) -> str:
    argv = [str(RELAY_SERVER), "token", "create", user, "--data-dir", str(data_dir)]
    for name in names:
        argv += ["--name", name]
    result = subprocess.run(
        argv, env=processes.env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
    )
    if result.returncode != 0:
        raise RunFailed(f"relay-server token create failed: {result.stderr.strip()}")
    return result.stdout.strip()


async def start_server(
    processes: Processes,
    http: aiohttp.ClientSession,
    label: str,
    extra: Iterable[str] = (),
    nofile: int | None = None,
) -> RelayServer:
    """A started ``relay-server serve`` on 127.0.0.1 (its own data dir), ready on /healthz.
    ``extra`` comes last, so the user's ``--server-arg`` overrides the bench's choices."""
    port = free_port()
    data_dir = processes.base / f"data-{label}"
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        str(RELAY_SERVER),
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
        "--public-url",
        f"http://localhost:{port}",
        "--log-level",
        "warning",
        *extra,
    ]
    child = processes.start(f"relay-server-{label}", argv, nofile=nofile)
    server = RelayServer(label, port, data_dir, child)

    async def healthy() -> bool:
        async with http.get(f"{server.base}/healthz", headers={"Host": server.apex}) as resp:
            return resp.status == 200

    await wait_until(healthy, f"relay-server ({label}) /healthz", processes, [child])
    return server


def start_agent(
    processes: Processes,
    server: RelayServer,
    token: str,
    target: Target,
    names: Iterable[str],
    *,
    mode: str | None = None,
    extra: Iterable[str] = (),
) -> Child:
    """A ``relay-agent connect`` process (not waited for: see ``wait_for_agents``)."""
    names = list(names)
    argv = [str(RELAY_AGENT), "connect", "--server", server.public_url, "--forward", target.forward]
    for name in names:
        argv += ["--name", name]
    if mode is not None:
        argv += ["--mode", mode]
    argv += ["--log-level", "warning", *extra]
    # The token goes in the environment, not argv, where ps would show it.
    return processes.start(f"relay-agent-{'+'.join(names)}", argv, env={"RELAY_TOKEN": token})


async def server_status(http: aiohttp.ClientSession, server: RelayServer) -> dict[str, Any]:
    """``GET /_relay/status``: answered to this host (127.0.0.1, no forwarding headers)."""
    async with http.get(f"{server.base}/_relay/status", headers={"Host": server.apex}) as resp:
        resp.raise_for_status()
        return dict(await resp.json())


async def wait_for_agents(
    processes: Processes,
    http: aiohttp.ClientSession,
    server: RelayServer,
    names: Iterable[str],
    agents: Iterable[Child],
    timeout: float = READY_TIMEOUT,
) -> None:
    """Until every name in ``names`` has an agent connected (the server's status says so)."""
    wanted = set(names)

    async def connected() -> bool:
        doc = await server_status(http, server)
        have = {t["name"] for t in doc["tunnels"] if t["agents"] >= 1}
        return wanted <= have

    await wait_until(
        connected,
        f"{len(wanted)} agent(s) on {server.label}",
        processes,
        [*agents, server.child],
        timeout,
        interval=0.1,
    )


async def wait_drained(
    http: aiohttp.ClientSession, server: RelayServer, timeout: float
) -> tuple[float | None, int]:
    """Wait until no event waits on ``server`` (queued webhooks delivered, those whose
    sender left mid-request included); returns the seconds it took (None after
    ``timeout``) and how many still wait."""
    started = time.monotonic()
    while True:
        doc = await server_status(http, server)
        waiting = sum(t["waiting"] for t in doc["tunnels"])
        now = time.monotonic()
        if waiting == 0:
            return now - started, 0
        if now - started > timeout:
            return None, waiting
        await asyncio.sleep(0.1)
