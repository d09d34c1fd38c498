"""Small webhooks: 1 KB JSON POSTs at each concurrency, direct, live tunnel, queue tunnel,
and the floor.

One relay-server, three ``relay-agent connect`` processes forwarding to the target:
``bench-live`` (``--mode live``), ``bench-bare`` (``--mode live --no-inspect``: nothing
recorded, what the inspector costs is the difference) and ``bench-queue`` (no ``--mode``:
the default, queue, with the tunnel's default delivery concurrency); and ``bench.floor``,
the least a Python relay does (its own server and agent). At each concurrency, in turn and
back to back (so the baseline sees the same machine load): straight to the target, through
the live tunnel and the bare one (taking turns going first), the floor, the queue tunnel.
A queue tunnel answers 200 when the app answered the first (inline) attempt, 202
when it stored the webhook for later; both are accepted webhooks and count in req/s, and
202s are counted apart. After each queue point the
bench waits for the stored events to reach the app, so they do not load the next point,
and checks that every webhook answered 2xx reached it (distinct ``X-Relay-Event-Id``).
"""

from __future__ import annotations

from typing import Any

from ..config import BenchConfig
from ..cpu import CpuMeter
from ..load import GRACE, Load, http_load, payload
from ..processes import (
    READY_TIMEOUT,
    Child,
    create_token,
    start_agent,
    start_floor,
    start_server,
    wait_drained,
    wait_for_agents,
)
from . import Context, compared, point, ratio

LIVE, BARE, QUEUE = "bench-live", "bench-bare", "bench-queue"
#: Seconds the queue tunnel's stored webhooks (202s) get to reach the app after a point.
DRAIN_TIMEOUT = 60.0
PATH = "/hook"


def budget(config: BenchConfig) -> float:
    per_point = config.warmup + config.duration + 2 * GRACE
    return 4 * READY_TIMEOUT + len(config.concurrency) * (5 * per_point + DRAIN_TIMEOUT)


async def run(ctx: Context) -> dict[str, Any]:
    cfg, procs, target = ctx.config, ctx.processes, ctx.target
    server = await start_server(procs, ctx.http, "small", cfg.server_args)
    started: list[Child] = [server.child]
    try:
        token = create_token(procs, server.data_dir, "bench")  # may claim bench and bench-*
        live = start_agent(procs, server, token, target, [LIVE], mode="live", extra=cfg.agent_args)
        bare = start_agent(
            procs, server, token, target, [BARE], mode="live", extra=["--no-inspect", *cfg.agent_args]
        )
        queue = start_agent(procs, server, token, target, [QUEUE], extra=cfg.agent_args)
        started += [live, bare, queue]
        await wait_for_agents(procs, ctx.http, server, [LIVE, BARE, QUEUE], [live, bare, queue])
        floor = await start_floor(procs, ctx.http, target)
        started += floor.children
        body = payload(cfg.small_body)
        relay = {"server": server.pid}
        # (name, base URL, Host, the processes whose CPU is measured besides the target's)
        paths: list[tuple[str, str, str, dict[str, int]]] = [
            ("direct", target.url(""), target.forward, {}),
            ("live", server.base, server.host(LIVE), relay | {"agent": live.pid}),
            ("bare", server.base, server.host(BARE), relay | {"agent": bare.pid}),
            ("floor", floor.base, target.forward, {"server": floor.server.pid, "agent": floor.agent.pid}),
            ("queue", server.base, server.host(QUEUE), relay | {"agent": queue.pid}),
        ]
        points: list[dict[str, Any]] = []
        for index, concurrency in enumerate(cfg.concurrency):
            row: dict[str, Any] = {"concurrency": concurrency}
            # live and bare take turns going first: whichever follows another point runs
            # on a machine in a slightly different state, and their difference is small.
            order = paths if index % 2 == 0 else [paths[0], paths[2], paths[1], *paths[3:]]
            for name, base, host, relay_pids in order:
                label = f"small-{name}-c{concurrency}"
                load = Load(base, PATH, (host,), body, concurrency)
                events_before = await target.events(ctx.http)
                accepted = 0
                if cfg.warmup >= 1:
                    warm = await http_load(procs, ctx.generator, label + "-warmup", load, cfg.warmup)
                    accepted += warm.ok
                meter = CpuMeter({"target": target.child.pid, **relay_pids})
                meter.start()
                result = await http_load(procs, ctx.generator, label, load, cfg.duration)
                cpu = meter.stop()
                procs.check_running(started)
                figures = point(result, cpu)
                if name != "direct":
                    figures = compared(figures, row["direct"])
                if name == "queue":
                    figures["vs_live"] = ratio(figures["rps"], row["live"]["rps"])
                    drained, left = await wait_drained(ctx.http, server, DRAIN_TIMEOUT)
                    figures["drained_s"] = None if drained is None else round(drained, 2)
                    figures["left_waiting"] = left
                    # Every webhook answered 2xx (warm-up included) must have reached the
                    # app: the target counts distinct X-Relay-Event-Id. Requests the
                    # generator abandoned at its end may add events no client saw accepted.
                    accepted += result.ok
                    delivered = await target.events(ctx.http) - events_before
                    figures["accepted"] = accepted
                    figures["delivered_events"] = delivered
                    figures["lost"] = max(0, accepted - delivered)
                row[name] = figures
                ctx.say(_line(concurrency, name, figures))
            for name in ("live", "bare"):
                row[name]["vs_floor"] = ratio(row[name]["rps"], row["floor"]["rps"])
            points.append(row)
        return {
            "body_bytes": len(body),
            "duration_s": cfg.duration,
            "warmup_s": cfg.warmup,
            "live_tunnel": LIVE,
            "bare_tunnel": BARE,
            "queue_tunnel": QUEUE,
            "points": points,
        }
    finally:
        await procs.stop(reversed(started))


def _line(concurrency: int, name: str, f: dict[str, Any]) -> str:
    extra = f"  x{f['ratio']:.2f} of direct" if "ratio" in f and f["ratio"] is not None else ""
    if f.get("status_202"):
        extra += f"  ({f['status_202']} answered 202)"
    if f.get("lost"):
        extra += f"  LOST {f['lost']} accepted webhooks"
    return (
        f"  c={concurrency:<3} {name:6} {f['rps']:9.0f} req/s  p50 {f['p50_ms']:7.2f} ms"
        f"  p99 {f['p99_ms']:7.2f} ms  errors {f['errors']}{extra}"
    )
