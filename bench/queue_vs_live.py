"""Queue mode against live mode, in one run, on real processes: requests/s and latency.

Run by hand (not a test)::

    .venv/bin/python bench/queue_vs_live.py                 # 10 s per phase, 16 clients
    .venv/bin/python bench/queue_vs_live.py --duration 5 --clients 32

It starts, under a temp dir, a ``relay-server`` (the console script next to this
interpreter), a small aiohttp target app on 127.0.0.1 (in its own process, so it
does not share a CPU with the load client), and two ``relay-agent connect``
processes forwarding to it: tunnel ``bench-live`` (``--mode live``) and tunnel
``bench-queue`` (``--mode queue``). Then, for a fixed duration each, N concurrent
clients POST 1 KiB JSON bodies, in turn:

1. straight to the target (the baseline: what the machine can do without a relay),
2. through the live tunnel,
3. through the queue tunnel (every request committed to SQLite before it is answered).

It prints requests/s, p50/p99 latency, the statuses seen, the ratios live/direct,
queue/direct and queue/live (the goal of issue 4: queue >= 0.5 x live), and checks
that every webhook the queue tunnel accepted reached the target. Everything it
started is stopped by PID at the end, and the whole run is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

BIN = Path(sys.executable).parent
RELAY_SERVER = BIN / "relay-server"
RELAY_AGENT = BIN / "relay-agent"
USER = "bench"
LIVE, QUEUE = "bench-live", "bench-queue"
#: Seconds a process gets to become ready before the run is abandoned.
READY_TIMEOUT = 30.0
#: Seconds after SIGTERM before SIGKILL.
STOP_GRACE = 10.0
#: Seconds the queue tunnel's backlog (202s) gets to reach the target after its phase.
DRAIN_TIMEOUT = 60.0


# -- the target app (run in a child process: ``--serve-target PORT``) --------------------------


def serve_target(port: int) -> None:
    """A local service that reads the body and answers 200; ``GET /counts`` tells what it got."""
    counts: Counter[str] = Counter()
    events: set[str] = set()

    async def hook(request: web.Request) -> web.Response:
        await request.read()
        counts[request.path] += 1
        event_id = request.headers.get("X-Relay-Event-Id")
        if event_id:
            events.add(event_id)
        return web.json_response({"ok": True})

    async def report(request: web.Request) -> web.Response:
        return web.json_response({"paths": dict(counts), "events": len(events)})

    app = web.Application()
    app.router.add_get("/counts", report)
    app.router.add_route("*", "/{tail:.*}", hook)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


# -- processes ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def filesystem_of(path: Path) -> str:
    """The type of the filesystem holding ``path`` (from /proc/mounts), or '?'."""
    best, kind = "", "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and str(path.resolve()).startswith(parts[1]) and len(parts[1]) > len(best):
                best, kind = parts[1], parts[2]
    return kind


class Processes:
    """What the run started: each child is stopped by its PID in ``stop_all``."""

    def __init__(self, base: Path, env: dict[str, str]) -> None:
        self.base = base
        self.env = env
        self.children: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def start(
        self, label: str, argv: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = self.base / f"{label}.log"
        with log.open("wb") as out:
            child = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env={**self.env, **(env or {})}
            )
        self.children.append((label, child, log))
        return child

    def check_running(self) -> None:
        for label, child, log in self.children:
            if child.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{label} (pid {child.pid}) exited with {child.returncode}:\n{tail}")

    def stop_all(self) -> None:
        for _, child, _ in reversed(self.children):
            if child.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for label, child, _ in reversed(self.children):
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"  {label} (pid {child.pid}) ignored SIGTERM: SIGKILL", file=sys.stderr)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGKILL)
                child.wait(5)


async def wait_until(check: Any, what: str, processes: Processes, timeout: float = READY_TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        processes.check_running()
        with contextlib.suppress(TimeoutError, aiohttp.ClientError, OSError):
            value = await check()
            if value:
                return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.05)


# -- load -------------------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    #: 2xx answers, warm-up and stragglers included: for the queue tunnel, events accepted.
    accepted: int = 0
    queued: int = 0

    @property
    def ok(self) -> int:
        return sum(n for s, n in self.statuses.items() if s.startswith("2"))

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def percentile(self, p: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1000


async def load(
    session: aiohttp.ClientSession,
    name: str,
    url: str,
    headers: dict[str, str],
    body: bytes,
    clients: int,
    duration: float,
    warmup: float,
) -> Result:
    """``clients`` loops POSTing ``body`` to ``url``; counted after ``warmup`` for ``duration`` s."""
    result = Result(name)
    start = time.monotonic()
    measure_from = start + warmup
    stop = measure_from + duration

    async def client() -> None:
        while (sent := time.monotonic()) < stop:
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    status = str(resp.status)
                    if 200 <= resp.status < 300:
                        result.accepted += 1
                        result.queued += resp.status == 202
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                status = type(exc).__name__
            done = time.monotonic()
            if sent >= measure_from and done <= stop:
                result.latencies.append(done - sent)
                result.statuses[status] += 1

    await asyncio.gather(*(client() for _ in range(clients)))
    result.seconds = duration
    return result


def payload(size: int) -> bytes:
    """A JSON object of exactly ``size`` bytes (at least 32), like a small webhook."""
    head = {"event": "push", "id": 0, "data": ""}
    pad = size - len(json.dumps(head, separators=(",", ":")))
    head["data"] = "x" * max(0, pad)
    return json.dumps(head, separators=(",", ":")).encode()


# -- the run ------------------------------------------------------------------------------------


async def run(args: argparse.Namespace, base: Path, processes: Processes) -> int:
    server_port, target_port = free_port(), free_port()
    data_dir = base / "data"
    public = f"http://localhost:{server_port}"
    apex = f"localhost:{server_port}"
    print(f"data dir {data_dir} on {filesystem_of(base)}; {os.cpu_count()} CPUs")
    if filesystem_of(base) == "tmpfs":
        print("  note: tmpfs makes fsync nearly free; use --tmp-dir on a real disk for honest figures")

    processes.start("target", [sys.executable, __file__, "--serve-target", str(target_port)])
    token = subprocess.run(
        [str(RELAY_SERVER), "token", "create", USER, "--data-dir", str(data_dir)],
        env=processes.env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.strip()
    processes.start(
        "relay-server",
        [
            str(RELAY_SERVER),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(server_port),
            "--data-dir",
            str(data_dir),
            "--public-url",
            public,
            "--log-level",
            "warning",
        ],
    )
    auth = {"Authorization": f"Bearer {token}", "Host": apex}
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:

        async def healthy() -> bool:
            async with http.get(f"http://127.0.0.1:{server_port}/healthz", headers={"Host": apex}) as r:
                return r.status == 200

        async def target_up() -> bool:
            async with http.get(f"http://127.0.0.1:{target_port}/counts") as r:
                return r.status == 200

        await wait_until(healthy, "relay-server /healthz", processes)
        await wait_until(target_up, "the target app", processes)
        queue_concurrency = args.max_concurrency or max(8, args.clients)
        for name, mode, extra in (
            (LIVE, "live", []),
            (QUEUE, "queue", ["--max-concurrency", str(queue_concurrency)]),
        ):
            processes.start(
                f"agent-{mode}",
                [
                    str(RELAY_AGENT),
                    "connect",
                    "--server",
                    public,
                    "--forward",
                    f"127.0.0.1:{target_port}",
                    "--name",
                    name,
                    "--mode",
                    mode,
                    "--log-level",
                    "warning",
                    *extra,
                ],
                env={"RELAY_TOKEN": token},  # not in argv, where ps would show it
            )

            async def connected(name: str = name, mode: str = mode) -> bool:
                async with http.get(
                    f"http://127.0.0.1:{server_port}/_relay/api/tunnels/{name}", headers=auth
                ) as r:
                    if r.status != 200:
                        return False
                    tunnel = await r.json()
                    return bool(tunnel["agents"] >= 1 and tunnel["settings"]["mode"] == mode)

            await wait_until(connected, f"the {mode} agent", processes)

        body = payload(args.body_size)
        json_type = {"Content-Type": "application/json"}
        phases = [
            ("direct", f"http://127.0.0.1:{target_port}/direct", json_type),
            ("live", f"http://127.0.0.1:{server_port}/t/{LIVE}/live", {**json_type, "Host": apex}),
            ("queue", f"http://127.0.0.1:{server_port}/t/{QUEUE}/queue", {**json_type, "Host": apex}),
        ]
        print(
            f"{args.clients} clients, {len(body)}-byte JSON POSTs, {args.duration:g} s per phase"
            f" (+{args.warmup:g} s warm-up); queue tunnel --max-concurrency {queue_concurrency}"
        )
        results: dict[str, Result] = {}
        for name, url, headers in phases:
            processes.check_running()
            results[name] = await load(
                http, name, url, headers, body, args.clients, args.duration, args.warmup
            )
            r = results[name]
            print(
                f"  {name:6}  {r.rps:8.0f} req/s   p50 {r.percentile(50):7.1f} ms"
                f"   p99 {r.percentile(99):7.1f} ms   statuses {dict(sorted(r.statuses.items()))}"
            )

        # Every webhook the queue tunnel accepted (200 inline, or 202 and delivered later)
        # must reach the target; it counts distinct X-Relay-Event-Id, so a retry counts once.
        async def counts() -> dict[str, Any]:
            async with http.get(f"http://127.0.0.1:{target_port}/counts") as r:
                return dict(await r.json())

        accepted = results["queue"].accepted

        async def all_delivered() -> bool:
            return bool((await counts())["events"] >= accepted)

        started = time.monotonic()
        drained = True
        try:
            await wait_until(
                all_delivered, "the queue tunnel's events to reach the target", processes, DRAIN_TIMEOUT
            )
            print(
                f"  queue: {accepted} events accepted ({results['queue'].queued} answered 202),"
                f" all at the target {time.monotonic() - started:.1f} s after the phase"
            )
        except TimeoutError as exc:
            drained = False
            print(f"  {exc}")
        target = await counts()

    direct, live, queue = results["direct"], results["live"], results["queue"]
    print()
    print(f"live/direct  {live.rps / direct.rps:5.2f}" if direct.rps else "live/direct  n/a")
    print(f"queue/direct {queue.rps / direct.rps:5.2f}" if direct.rps else "queue/direct n/a")
    ratio = queue.rps / live.rps if live.rps else 0.0
    verdict = "meets" if ratio >= 0.5 else "MISSES"
    print(f"queue/live   {ratio:5.2f}   ({verdict} the goal queue >= 0.5 x live)")
    print(f"target received {target['paths']}; distinct event ids {target['events']}")
    errors = sum(n for r in results.values() for s, n in r.statuses.items() if not s.startswith("2"))
    if errors:
        print(f"non-2xx answers or client errors: {errors}")
    return 0 if ratio >= 0.5 and drained else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured per phase (10)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before measuring (1)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (16)")
    parser.add_argument("--body-size", type=int, default=1024, help="bytes of each JSON body (1024)")
    parser.add_argument(
        "--max-concurrency",
        type=int,
        default=None,
        help="the queue tunnel's --max-concurrency (default: the number of clients, at least 8)",
    )
    parser.add_argument("--tmp-dir", type=Path, default=None, help="where the temp dir goes (system temp)")
    parser.add_argument("--serve-target", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_target is not None:
        serve_target(args.serve_target)
        return 0
    for script in (RELAY_SERVER, RELAY_AGENT):
        if not script.exists():
            print(f"{script} is missing: pip install -e . in this venv", file=sys.stderr)
            return 2
    # Bounded: startup, three phases, the drain, and slack.
    budget = 3 * (args.duration + args.warmup) + 2 * READY_TIMEOUT + DRAIN_TIMEOUT + 60
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_") and "proxy" not in k.lower()}
    with tempfile.TemporaryDirectory(prefix="relay-bench-", dir=args.tmp_dir) as tmp:
        base = Path(tmp)
        env["XDG_CONFIG_HOME"] = str(base / "config")  # never the user's saved login
        processes = Processes(base, env)
        try:
            return asyncio.run(asyncio.wait_for(run(args, base, processes), budget))
        except (TimeoutError, RuntimeError, subprocess.SubprocessError) as exc:
            print(f"bench failed: {exc}", file=sys.stderr)
            return 2
        finally:
            processes.stop_all()


if __name__ == "__main__":
    sys.exit(main())
