"""The run's figures: the goals they are judged by, a table for people, JSON for tools.

The JSON (``bench/results/latest.json`` by default) holds the same figures as the table,
and more (statuses, per-transfer seconds, RSS before and after); its sections are named
after the scenarios, and a section that could not be measured holds ``{"error": ...}``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

KIB, MIB = 1024, 1024 * 1024

#: The goals of issue 10. A miss is printed, never an error: timings on a shared machine
#: are not tests.
LIVE_RATIO = {16: 0.19, 64: 0.21}
LIVE_P50_C1_MS = 1.0
QUEUE_VS_LIVE = 0.5
#: "Not degrading": a queue point may fall this far below a lower concurrency's (noise).
QUEUE_DEGRADE_TOLERANCE = 0.9
TRANSFER_MB_S = 300.0
RSS_GROWTH_MIB = 48
SCALE_AGENTS = 10_000
RSS_PER_AGENT_KIB = 50
#: Issue 11: recording for the inspector must not slow the hot path measurably. The
#: agent's CPU per live request, with the inspector and without (``--no-inspect``), may
#: differ by this share: less than this run-to-run noise of the figure on a shared machine.
INSPECTOR_CPU_SHARE = 0.05


@dataclass
class Goal:
    goal: str
    value: str
    passed: bool | None  # None: not measured in this run
    note: str = ""

    @property
    def mark(self) -> str:
        return {True: "PASS", False: "MISS", None: "n/a "}[self.passed]


def goals(doc: dict[str, Any]) -> list[Goal]:
    out: list[Goal] = []
    small = doc.get("small") or {}
    points = {p["concurrency"]: p for p in small.get("points", [])}
    for c, want in LIVE_RATIO.items():
        text = f"live >= {want} x direct at c={c}, zero errors"
        p = points.get(c)
        if p is None:
            out.append(Goal(text, "not measured", None))
            continue
        live = p["live"]
        ok = live["ratio"] is not None and live["ratio"] >= want and live["errors"] == 0
        out.append(Goal(text, f"{live['ratio']:.3f}, {live['errors']} errors", ok))
    text = f"live p50 <= {LIVE_P50_C1_MS:g} ms at c=1"
    if 1 in points:
        p50 = points[1]["live"]["p50_ms"]
        out.append(
            Goal(text, f"{p50:.3f} ms (direct {points[1]['direct']['p50_ms']:.3f} ms)", p50 <= LIVE_P50_C1_MS)
        )
    else:
        out.append(Goal(text, "not measured", None))
    ordered = [points[c] for c in sorted(points)]
    text = f"queue >= {QUEUE_VS_LIVE} x live at every concurrency"
    if ordered:
        worst = min(ordered, key=lambda p: p["queue"]["vs_live"] or 0.0)
        v = worst["queue"]["vs_live"] or 0.0
        out.append(Goal(text, f"lowest {v:.3f} at c={worst['concurrency']}", v >= QUEUE_VS_LIVE))
        text = "queue req/s not degrading with concurrency"
        rates = [(p["concurrency"], p["queue"]["rps"]) for p in ordered]
        falls = [
            (c, rps / max(r for _, r in rates[:i]))
            for i, (c, rps) in enumerate(rates)
            if i and max(r for _, r in rates[:i])
        ]
        low = min(falls, key=lambda f: f[1], default=None)
        value = " -> ".join(f"{rps:.0f}" for _, rps in rates)
        out.append(
            Goal(
                text,
                value,
                low is None or low[1] >= QUEUE_DEGRADE_TOLERANCE,
                f"each >= {QUEUE_DEGRADE_TOLERANCE:g} x the best at a lower concurrency",
            )
        )
    else:
        out.append(Goal(text, "not measured", None))
    out.append(inspector_goal(ordered))
    large = doc.get("large") or {}
    size = f"{large['bytes'] / MIB:g} MiB" if "bytes" in large else "large body"
    for direction in ("up", "down"):
        relay = (large.get(direction) or {}).get("relay")
        text = f"{size} {direction} >= {TRANSFER_MB_S:g} MB/s through the relay"
        if relay is None:
            out.append(Goal(text, "not measured", None))
            out.append(
                Goal(f"{size} {direction}: peak RSS growth < {RSS_GROWTH_MIB} MiB", "not measured", None)
            )
            continue
        out.append(Goal(text, f"{relay['mb_per_s']:.1f} MB/s", relay["mb_per_s"] >= TRANSFER_MB_S))
        growth = {k: v["growth"] for k, v in relay["rss"].items()}
        value = ", ".join(f"{k} {v / MIB:.1f} MiB" for k, v in growth.items())
        ok = relay.get("peak_reset", True) and all(v < RSS_GROWTH_MIB * MIB for v in growth.values())
        note = "" if relay.get("peak_reset", True) else "VmHWM could not be reset: peak is since start"
        out.append(Goal(f"{size} {direction}: peak RSS growth < {RSS_GROWTH_MIB} MiB", value, ok, note))
    scale = doc.get("scale") or {}
    text = f"{SCALE_AGENTS:,} idle agents at <= {RSS_PER_AGENT_KIB} KiB server RSS each"
    if "rss_per_agent_bytes" in scale:
        per = scale["rss_per_agent_bytes"] / KIB
        full = scale["connected"] >= SCALE_AGENTS
        note = (
            ""
            if full
            else f"measured with {scale['connected']:,} agents, not {SCALE_AGENTS:,}: --agents 10000"
        )
        out.append(Goal(text, f"{per:.1f} KiB per agent", per <= RSS_PER_AGENT_KIB, note))
    else:
        out.append(Goal(text, "not measured", None))
    return out


def inspector_cost(points: list[dict[str, Any]]) -> tuple[float, float] | None:
    """The agent's CPU ms per live request with the inspector and without it (``bare``),
    over every point that measured both, weighted by requests; None when none did."""
    pairs = [
        (p["live"], p["bare"])
        for p in points
        if "bare" in p
        and "agent" in p["live"]["cpu_ms_per_request"]
        and "agent" in p["bare"]["cpu_ms_per_request"]
    ]
    if not pairs:
        return None

    def mean(side: int) -> float:
        weights = sum(pair[side]["requests"] for pair in pairs)
        total = sum(pair[side]["cpu_ms_per_request"]["agent"] * pair[side]["requests"] for pair in pairs)
        return total / weights if weights else 0.0

    return mean(0), mean(1)


def inspector_goal(points: list[dict[str, Any]]) -> Goal:
    text = f"inspector costs the agent <= {INSPECTOR_CPU_SHARE:.0%} CPU per live request"
    cost = inspector_cost(points)
    if cost is None or not cost[1]:
        return Goal(text, "not measured", None)
    inspected, bare = cost
    share = inspected / bare - 1
    value = f"{share:+.1%} ({inspected:.3f} ms with, {bare:.3f} ms --no-inspect)"
    return Goal(text, value, share <= INSPECTOR_CPU_SHARE)


# -- the table ---------------------------------------------------------------------------


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        indent
        + "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


#: A load generator using this share of a core (or more) may be what limits the point.
GENERATOR_LIMIT = 0.9


def _gen(share: float) -> str:
    """The load generator's CPU share; "!" where it may be the bottleneck."""
    return f"{share:.0%}" + (" !" if share >= GENERATOR_LIMIT else "")


def _errors(f: dict[str, Any]) -> str:
    """Non-2xx answers plus socket errors, the latter named when there are any."""
    sockets = sum(f["socket_errors"].values())
    return str(f["errors"]) + (f" ({sockets} socket)" if sockets else "")


def _ms(cpu: dict[str, float], key: str) -> str:
    return f"{cpu[key]:.3f}" if key in cpu else "-"


def _small_lines(small: dict[str, Any]) -> list[str]:
    out: list[str] = []
    out.append(
        f"Small webhooks: {small['body_bytes']}-byte JSON POST, {small['duration_s']:g} s per point"
        f" (+{small['warmup_s']:g} s warm-up); ratio = relay / direct; CPU ms per request"
    )
    rows = [
        [
            "c",
            "path",
            "req/s",
            "ratio",
            "p50 ms",
            "ratio",
            "p99 ms",
            "ratio",
            "2xx",
            "of them 202",
            "errors",
            "server",
            "agent",
            "app",
            "q/live",
            "/floor",
            "loadgen CPU",
        ]
    ]
    for p in small["points"]:
        for name in ("direct", "live", "bare", "floor", "queue"):
            if name not in p:
                continue  # a run from before the bare tunnel or the floor
            f = p[name]
            cpu = f["cpu_ms_per_request"]
            rows.append(
                [
                    str(p["concurrency"]),
                    name,
                    f"{f['rps']:.0f}",
                    _x(f.get("ratio")),
                    f"{f['p50_ms']:.2f}",
                    _x(f.get("p50_ratio")),
                    f"{f['p99_ms']:.2f}",
                    _x(f.get("p99_ratio")),
                    str(f["requests"] - f["non_2xx"]),
                    str(f["status_202"]),
                    _errors(f),
                    _ms(cpu, "server"),
                    _ms(cpu, "agent"),
                    _ms(cpu, "target"),
                    _x(f.get("vs_live")),
                    _x(f.get("vs_floor")),
                    _gen(f["generator_cpu_share"]),
                ]
            )
    out += _table(rows)
    out.append("  bare: the live tunnel's agent run with --no-inspect (nothing recorded)")
    out.append(
        "  floor: bench.floor, the least a Python relay does on the relay's stack (its own server"
        " and agent); /floor: req/s over the floor's"
    )
    points = small["points"]
    lost = sum(p["queue"]["lost"] for p in points)
    undrained = [str(p["concurrency"]) for p in points if p["queue"]["drained_s"] is None]
    accepted = sum(p["queue"]["accepted"] for p in points)
    out.append(
        f"  queue: {accepted} webhooks accepted (warm-ups included),"
        + (f" LOST {lost} (not at the app)" if lost else " every one reached the app")
        + (f"; still waiting after c={','.join(undrained)}" if undrained else "")
    )
    return out


def _large_lines(large: dict[str, Any]) -> list[str]:
    out: list[str] = []
    out.append(
        f"Large bodies: {large['bytes'] / MIB:g} MiB up (POST, read and discarded) and down (GET),"
        f" live tunnel, client {large['client']}; peak RSS growth over the relayed transfers"
    )
    rows = [
        [
            "dir",
            "path",
            "MB/s",
            "ratio",
            "server RSS growth",
            "agent RSS growth",
            "server CPU s/GB",
            "agent CPU s/GB",
            "transfers",
        ]
    ]
    for direction in ("up", "down"):
        for way in ("direct", "relay"):
            f = large[direction][way]
            rss = f.get("rss", {})
            cpu = f.get("cpu_s_per_gb", {})
            rows.append(
                [
                    direction,
                    way,
                    f"{f['mb_per_s']:.1f}",
                    _x(f.get("ratio")),
                    f"{rss['server']['growth'] / MIB:.1f} MiB" if rss else "-",
                    f"{rss['agent']['growth'] / MIB:.1f} MiB" if rss else "-",
                    f"{cpu['server']:.2f}" if cpu else "-",
                    f"{cpu['agent']:.2f}" if cpu else "-",
                    str(f["transfers"]),
                ]
            )
    out += _table(rows)
    return out


def _scale_lines(scale: dict[str, Any]) -> list[str]:
    out: list[str] = []
    lat = scale["latency"]
    out.append(f"Scale: {scale['agents']:,} idle agents held by one process (bench.holder), one socket each")
    out.append(
        f"  connected {scale['connected']:,} of {scale['agents']:,}"
        f" in {scale['connect_seconds']:.1f} s ({scale['agents_per_second']}/s),"
        f" server CPU {scale['server_cpu_ms_per_connect']:.2f} ms per connect"
        + (f"; {scale['failed']} failed: {scale['first_error']}" if scale["failed"] else "")
    )
    out.append(
        f"  server RSS {scale['server_rss_one_agent'] / MIB:.1f} MiB with one agent,"
        f" {scale['server_rss_all_agents'] / MIB:.1f} MiB with {scale['connected']:,}:"
        f" {scale['rss_per_agent_bytes'] / KIB:.1f} KiB per agent (goal <= {RSS_PER_AGENT_KIB} KiB);"
        f" {scale['server_fds']:,} descriptors open"
    )
    out.append(
        f"  GET through the last agent's tunnel: p50 {lat['last_agent']['p50_ms']:.2f} ms,"
        f" max {lat['last_agent']['max_ms']:.2f} ms; baseline with one agent connected:"
        f" p50 {lat['one_agent']['p50_ms']:.2f} ms, max {lat['one_agent']['max_ms']:.2f} ms;"
        f" ratio {_x(lat['p50_ratio'])}"
    )
    out.append(
        f"  server CPU while they idle: {scale['server_idle_cpu_share']:.1%} of a core;"
        f" holder RSS {scale['holder_rss_bytes'] / MIB:.0f} MiB"
    )
    return out


def _fanin_lines(fanin: dict[str, Any]) -> list[str]:
    out: list[str] = []
    out.append(
        f"Fan-in: {fanin['tunnels']} tunnels at once, a relay-agent process each"
        f" ({fanin['mode']} mode),"
        f" {fanin['concurrency']} connections, each request to the next tunnel; CPU ms per request"
    )
    rows = [
        [
            "path",
            "",
            "req/s",
            "ratio",
            "p50 ms",
            "ratio",
            "p99 ms",
            "ratio",
            "errors",
            "server",
            "agents",
            "app",
            "loadgen CPU",
        ]
    ]
    for way in ("direct", "relay"):
        f = fanin[way]
        cpu = f["cpu_ms_per_request"]
        rows.append(
            [
                way,
                "",
                f"{f['rps']:.0f}",
                _x(f.get("ratio")),
                f"{f['p50_ms']:.2f}",
                _x(f.get("p50_ratio")),
                f"{f['p99_ms']:.2f}",
                _x(f.get("p99_ratio")),
                _errors(f),
                _ms(cpu, "server"),
                _ms(cpu, "agents"),
                _ms(cpu, "target"),
                _gen(f["generator_cpu_share"]),
            ]
        )
    out += _table(rows)
    out.append(
        f"  {fanin['tunnels']} agent processes: started and connected"
        f" in {fanin['agent_start_seconds']:.1f} s,"
        f" {fanin['agents_rss_bytes'] / MIB:.0f} MiB RSS together"
    )
    return out


#: The report's sections: key in the document, title, lines of its figures.
SECTIONS: tuple[tuple[str, str, Callable[[dict[str, Any]], list[str]]], ...] = (
    ("small", "Small webhooks", _small_lines),
    ("large", "Large bodies", _large_lines),
    ("scale", "Scale", _scale_lines),
    ("fanin", "Fan-in", _fanin_lines),
)


def render(doc: dict[str, Any], judged: list[Goal]) -> str:
    out: list[str] = []
    tools = doc["tools"]
    m = doc["machine"]
    out.append(
        f"relay bench {doc['started']}  {m['cpus']} CPUs, load {m['load_before']} before,"
        f" {m['load_after']} after; load generator {tools['load_generator']}, target {tools['target']},"
        f" transfers {tools['transfer_client']}; relay {tools.get('relay_build', '?')}"
        f"{'  [SMOKE: figures not worth reading]' if doc['options']['smoke'] else ''}"
    )
    for key, title, lines in SECTIONS:
        section = doc.get(key)
        if section is not None:
            out.append("")
            if "error" in section:
                out.append(f"{title}: NOT MEASURED: {section['error']}")
            else:
                out += lines(section)
    if "% !" in "\n".join(out):
        out.append("")
        out.append(
            f"  ! the load generator used >= {GENERATOR_LIMIT:.0%} of a core: it may be what limits the point"
        )
    out.append("")
    out.append("Goals (a miss is reported, never an error)")
    for g in judged:
        note = f"  ({g.note})" if g.note else ""
        out.append(f"  {g.mark}  {g.goal:58} {g.value}{note}")
    return "\n".join(out)


def write_json(path: Path, doc: dict[str, Any], judged: list[Goal]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    full = {**doc, "goals": [asdict(g) for g in judged]}
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(full, indent=2) + "\n")
    tmp.replace(path)
