"""Scale: N idle agents held by one process (``bench.holder``), on a relay-server of their own.

The holder opens N protocol sessions, one connection each, every one with its own name
(``scale-0`` .. ``scale-{N-1}``) under one token that may claim ``scale-*``. Both the
server and the holder run with RLIMIT_NOFILE raised to the hard limit, and the server
with ``--max-connections`` and ``--max-connections-per-client`` above N (all come from
127.0.0.1). Figures, each beside its baseline:

- server RSS per agent: (RSS with N agents - RSS with one agent) / (N - 1);
- time to connect N - 1 agents after the first (64 handshakes in flight at once);
- latency of a GET through the last agent's tunnel, beside the same GET through the
  first agent's tunnel measured while it was the only one connected;
- the server's CPU share while the N agents sit idle (their heartbeats).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ..config import BenchConfig
from ..cpu import CpuMeter, rss_bytes
from ..processes import READY_TIMEOUT, Child, RelayServer, RunFailed, create_token, start_server
from . import Context, ratio

PREFIX = "scale-"
#: GETs timed through a tunnel (one after the other, on one kept-alive connection).
PROBES = 20
#: Seconds per agent allowed for connecting, on top of a fixed minute.
CONNECT_SECONDS_PER_AGENT = 0.05
#: Seconds the server's idle CPU is watched with every agent connected.
IDLE_WATCH = 3.0


def budget(config: BenchConfig) -> float:
    return 3 * READY_TIMEOUT + 60 + config.agents * CONNECT_SECONDS_PER_AGENT + IDLE_WATCH + 60


class HolderLines:
    """The holder's stdout lines (JSON), read on a thread and handed to the event loop."""

    def __init__(self, child: Child) -> None:
        self.child = child
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def pump() -> None:
            assert child.popen.stdout is not None
            for raw in iter(child.popen.stdout.readline, b""):
                try:
                    doc = json.loads(raw)
                except ValueError:
                    continue
                loop.call_soon_threadsafe(self.queue.put_nowait, doc)
            loop.call_soon_threadsafe(self.queue.put_nowait, None)

        threading.Thread(target=pump, daemon=True).start()

    async def event(self, name: str, timeout: float) -> dict[str, Any]:
        """The next line whose event is ``name`` (progress lines are skipped)."""
        async with asyncio.timeout(timeout):
            while True:
                doc = await self.queue.get()
                if doc is None:
                    raise RunFailed(f"the holder exited before '{name}': {self.child.describe()}")
                if doc.get("event") == name:
                    return doc

    def send(self, line: str) -> None:
        assert self.child.popen.stdin is not None
        self.child.popen.stdin.write(line.encode() + b"\n")
        self.child.popen.stdin.flush()


async def _probe(ctx: Context, server: RelayServer, name: str) -> dict[str, Any]:
    """Time ``PROBES`` GETs through tunnel ``name`` (the first one opens the connection),
    once one answers 200 (the server registers a session just after its WELCOME)."""
    url = f"{server.base}/probe"
    headers = {"Host": server.host(name)}
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        async with ctx.http.get(url, headers=headers) as resp:
            if resp.status == 200 and await resp.read() == b"ok":
                break
        if time.monotonic() > deadline:
            raise RunFailed(f"tunnel {name} never answered 200 (last: {resp.status})")
        await asyncio.sleep(0.05)
    times = []
    for _ in range(PROBES):
        sent = time.perf_counter()
        async with ctx.http.get(url, headers=headers) as resp:
            await resp.read()
            if resp.status != 200:
                raise RunFailed(f"tunnel {name} answered {resp.status}")
        times.append((time.perf_counter() - sent) * 1000)
    return {
        "p50_ms": round(statistics.median(times), 3),
        "max_ms": round(max(times), 3),
        "min_ms": round(min(times), 3),
    }


def _fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


async def run(ctx: Context) -> dict[str, Any]:
    cfg, procs = ctx.config, ctx.processes
    count = max(2, cfg.agents)
    room = str(count + 1024)
    nofile = count + 2048
    server = await start_server(
        procs,
        ctx.http,
        "scale",
        [
            *("--max-connections", room, "--max-connections-per-client", room),
            *("--max-agents-per-user", room),  # every session is the one user's
            *("--max-names-per-user", room),  # each with a name of its own
            *cfg.server_args,
        ],
        nofile=nofile,
    )
    started: list[Child] = [server.child]
    try:
        token = create_token(procs, server.data_dir, "scale", [f"{PREFIX}*"])
        argv = [
            sys.executable,
            "-m",
            "bench.holder",
            "--url",
            server.agent_url,
            "--count",
            str(count),
            "--prefix",
            PREFIX,
        ]
        holder = procs.start(
            "holder",
            argv,
            env={"RELAY_TOKEN": token},
            nofile=nofile,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        started.append(holder)
        lines = HolderLines(holder)
        await lines.event("first", READY_TIMEOUT)
        one = await _probe(ctx, server, f"{PREFIX}0")
        rss_before = rss_bytes(server.pid)
        cpu = CpuMeter({"server": server.pid, "holder": holder.pid})
        cpu.start()
        lines.send("go")
        done = await lines.event("all", 60 + count * CONNECT_SECONDS_PER_AGENT)
        connect_cpu = cpu.stop()
        if done["failed"]:
            ctx.say(f"  {done['failed']} of {count} agents failed to connect; first: {done['error']}")
        last = await _probe(ctx, server, f"{PREFIX}{count - 1}")
        rss_after = rss_bytes(server.pid)
        idle = CpuMeter({"server": server.pid})
        idle.start()
        watched = time.monotonic()
        await asyncio.sleep(min(IDLE_WATCH, cfg.duration))  # measuring an idle period: nothing to poll for
        idle_share = idle.stop()["server"] / (time.monotonic() - watched)
        procs.check_running(started)
        connected = int(done["connected"])
        per_agent = (rss_after - rss_before) / max(1, connected - 1)
        out = {
            "agents": count,
            "connected": connected,
            "failed": done["failed"],
            "first_error": done["error"],
            "connect_seconds": done["seconds"],
            "agents_per_second": round((connected - 1) / done["seconds"], 1) if done["seconds"] else None,
            "server_cpu_ms_per_connect": round(connect_cpu["server"] * 1000 / max(1, connected - 1), 3),
            "server_rss_one_agent": rss_before,
            "server_rss_all_agents": rss_after,
            "rss_per_agent_bytes": round(per_agent),
            "server_fds": _fds(server.pid),
            "server_idle_cpu_share": round(idle_share, 3),
            "holder_rss_bytes": int(done["rss_kib"]) * 1024,
            "latency": {
                "one_agent": one,
                "last_agent": last,
                "p50_ratio": ratio(last["p50_ms"], one["p50_ms"]),
            },
        }
        ctx.say(
            f"  {connected} agents in {done['seconds']:.1f} s ({out['agents_per_second']}/s);"
            f" server RSS {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB,"
            f" {per_agent / 1024:.1f} KiB per agent; GET through the last tunnel p50 {last['p50_ms']:.2f} ms"
            f" (one agent: {one['p50_ms']:.2f} ms); idle server CPU {idle_share:.0%}"
        )
        return out
    finally:
        await procs.stop(reversed(started))
