"""Large bodies: one big POST up (the app reads and discards it, answering its length) and
one big GET down (the app streams it), straight to the app and through a live tunnel.

MB/s is total bytes over total transfer time, the transfers of a kind repeated until
``--duration`` is spent (at least twice; once with ``--smoke``). The relay's memory
cost is the peak RSS growth of relay-server and relay-agent over the relayed transfers:
each process's peak (VmHWM) is reset to its RSS before them (``echo 5 >
/proc/PID/clear_refs``), and the growth is VmHWM after, less VmRSS before.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from ..config import BenchConfig
from ..cpu import MIB, CpuMeter, PeakMeter
from ..load import GRACE, TransferSeries, transfer
from ..processes import READY_TIMEOUT, Child, create_token, start_agent, start_server, wait_for_agents
from . import Context, ratio

NAME = "bench-big"
#: Most transfers of one kind (direction, direct or relayed) in a run, and with --smoke.
MAX_REPEATS = 20
SMOKE_REPEATS = 3
#: Seconds one transfer may take before the run gives up on it.
TRANSFER_TIMEOUT = 120.0 + GRACE


def budget(config: BenchConfig) -> float:
    return 2 * READY_TIMEOUT + 4 * (config.duration + 2 * TRANSFER_TIMEOUT)


def _body_file(ctx: Context) -> Path:
    path = ctx.processes.base / "large-body.bin"
    block = os.urandom(MIB)  # incompressible, not that anything compresses it
    with path.open("wb") as f:
        left = ctx.config.large_body
        while left > 0:
            f.write(block[: min(left, MIB)])
            left -= MIB
    return path


async def run(ctx: Context) -> dict[str, Any]:
    cfg, procs, target = ctx.config, ctx.processes, ctx.target
    size = cfg.large_body
    body_file = _body_file(ctx)
    server = await start_server(procs, ctx.http, "large", cfg.server_args)
    started: list[Child] = [server.child]
    try:
        token = create_token(procs, server.data_dir, "bench")
        agent = start_agent(procs, server, token, target, [NAME], mode="live", extra=cfg.agent_args)
        started.append(agent)
        await wait_for_agents(procs, ctx.http, server, [NAME], [agent])
        least, most = (1, SMOKE_REPEATS) if cfg.smoke else (2, MAX_REPEATS)
        out: dict[str, Any] = {"bytes": size, "client": ctx.transfer_client}
        for direction, path in (("up", "/upload"), ("down", f"/download?bytes={size}")):
            section: dict[str, Any] = {}
            for way, base, host in (
                ("direct", target.url(""), target.forward),
                ("relay", server.base, server.host(NAME)),
            ):
                pids = {"server": server.pid, "agent": agent.pid}
                peaks, cpu = PeakMeter(pids), CpuMeter(pids)
                peaks.start()
                cpu.start()
                series = TransferSeries()
                deadline = time.monotonic() + cfg.duration
                while len(series.transfers) < least or (
                    time.monotonic() < deadline and len(series.transfers) < most
                ):
                    label = f"large-{direction}-{way}-{len(series.transfers)}"
                    series.transfers.append(
                        await transfer(
                            procs,
                            ctx.transfer_client,
                            label,
                            direction=direction,
                            url=base + path,
                            host=host,
                            size=size,
                            body_file=body_file,
                        )
                    )
                used = cpu.stop()
                grown = peaks.stop()
                procs.check_running(started)
                figures: dict[str, Any] = {
                    "mb_per_s": round(series.mb_per_s, 1),
                    "transfers": len(series.transfers),
                    "seconds": [round(t.seconds, 3) for t in series.transfers],
                }
                if way == "relay":
                    figures["ratio"] = ratio(figures["mb_per_s"], section["direct"]["mb_per_s"])
                    figures["rss"] = grown
                    figures["peak_reset"] = peaks.reset
                    gigabytes = size * len(series.transfers) / 1e9
                    figures["cpu_s_per_gb"] = {k: round(v / gigabytes, 3) for k, v in used.items()}
                section[way] = figures
                ctx.say(_line(direction, way, figures))
            out[direction] = section
        return out
    finally:
        await procs.stop(reversed(started))


def _line(direction: str, way: str, f: dict[str, Any]) -> str:
    text = f"  {direction:4} {way:6} {f['mb_per_s']:8.1f} MB/s  ({f['transfers']} transfers)"
    if "rss" in f:
        text += f"  x{f['ratio']:.2f} of direct;  peak RSS growth" + "".join(
            f"  {label} {m['growth'] / MIB:.1f} MiB" for label, m in f["rss"].items()
        )
    return text
