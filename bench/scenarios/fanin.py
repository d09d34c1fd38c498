"""Fan-in: many tunnels receiving traffic at once, each served by its own relay-agent process.

N ``relay-agent connect --mode live`` processes (one tunnel each, ``fanin-000`` ..), one
relay-server, one target. The load generator holds N connections; every request goes
to the next tunnel in turn, so all N tunnels (and agents) are busy at once. The
baseline is the same load, with the same rotation machinery, straight to the target.
"""

from __future__ import annotations

import time
from typing import Any

from ..config import BenchConfig
from ..cpu import CpuMeter, rss_bytes
from ..load import GRACE, Load, http_load, payload
from ..processes import READY_TIMEOUT, Child, create_token, start_agent, start_server, wait_for_agents
from . import Context, compared, point

PATH = "/hook"
#: Seconds per agent process allowed for starting and connecting (a Python process
#: importing aiohttp and websockets costs about half a CPU second), on top of READY_TIMEOUT.
START_SECONDS_PER_AGENT = 1.0


def budget(config: BenchConfig) -> float:
    start = READY_TIMEOUT + config.fanin_tunnels * START_SECONDS_PER_AGENT
    return start + READY_TIMEOUT + 2 * (config.warmup + config.duration + 2 * GRACE) + 60


async def run(ctx: Context) -> dict[str, Any]:
    cfg, procs, target = ctx.config, ctx.processes, ctx.target
    count = max(1, cfg.fanin_tunnels)
    server = await start_server(procs, ctx.http, "fanin", cfg.server_args)
    started: list[Child] = [server.child]
    try:
        token = create_token(procs, server.data_dir, "fanin")  # may claim fanin-*
        names = [f"fanin-{i:03d}" for i in range(count)]
        began = time.monotonic()
        agents = [
            start_agent(procs, server, token, target, [name], mode="live", extra=cfg.agent_args)
            for name in names
        ]
        started += agents
        await wait_for_agents(
            procs, ctx.http, server, names, agents, READY_TIMEOUT + count * START_SECONDS_PER_AGENT
        )
        start_seconds = time.monotonic() - began
        ctx.say(f"  {count} agent processes connected in {start_seconds:.1f} s")
        body = payload(cfg.small_body)
        ways = [
            ("direct", target.url(""), [target.forward] * count, {"target": target.child.pid}),
            (
                "relay",
                server.base,
                [server.host(n) for n in names],
                {"target": target.child.pid, "server": server.pid}
                | {n: a.pid for n, a in zip(names, agents, strict=True)},
            ),
        ]
        out: dict[str, Any] = {
            "tunnels": count,
            "agent_processes": count,
            "concurrency": count,
            "mode": "live",
        }
        for way, base, hosts, pids in ways:
            label = f"fanin-{way}"
            load = Load(base, PATH, tuple(hosts), body, count)
            if cfg.warmup >= 1:
                await http_load(procs, ctx.generator, label + "-warmup", load, cfg.warmup)
            meter = CpuMeter(pids)
            meter.start()
            result = await http_load(procs, ctx.generator, label, load, cfg.duration)
            used = meter.stop()
            procs.check_running(started)
            cpu = {"target": used.pop("target")}
            if way == "relay":
                cpu["server"] = used.pop("server")
                cpu["agents"] = sum(used.values())  # all agent processes together
            figures = point(result, cpu)
            if way == "relay":
                figures = compared(figures, out["direct"])
            out[way] = figures
            ctx.say(
                f"  {way:6} {figures['rps']:9.0f} req/s  p50 {figures['p50_ms']:7.2f} ms"
                f"  p99 {figures['p99_ms']:7.2f} ms  errors {figures['errors']}"
            )
        out["agent_start_seconds"] = round(start_seconds, 2)
        out["agents_rss_bytes"] = sum(rss_bytes(a.pid) for a in agents)
        out["server_rss_bytes"] = rss_bytes(server.pid)
        return out
    finally:
        await procs.stop(reversed(started))
