"""The scenarios, one module each: ``small``, ``large``, ``scale``, ``fanin``.

Each has ``async def run(ctx) -> dict`` (its figures, JSON-ready, each next to its
baseline and their ratio) and ``budget(config) -> seconds`` (the most it may take).
Each starts its own relay-server (a fresh data dir, so one scenario's memory and
store do not weigh on the next) and stops what it started before it returns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from ..config import BenchConfig
from ..load import LoadResult
from ..processes import Processes, Target


@dataclass
class Context:
    config: BenchConfig
    processes: Processes
    http: aiohttp.ClientSession
    target: Target
    generator: str  # "wrk" or "python"
    transfer_client: str  # "curl" or "python"
    say: Callable[[str], None]  # a progress line


def ratio(value: float, baseline: float) -> float | None:
    return round(value / baseline, 3) if baseline else None


def point(result: LoadResult, cpu: dict[str, float]) -> dict[str, Any]:
    """One load point's figures; ``cpu``: CPU seconds per process over the point."""
    requests = max(1, result.requests)
    return {
        "rps": round(result.rps, 1),
        "requests": result.requests,
        "seconds": round(result.seconds, 3),
        "p50_ms": round(result.p50_ms, 3),
        "p99_ms": round(result.p99_ms, 3),
        "statuses": dict(sorted(result.statuses.items())),
        "status_202": result.statuses.get("202", 0),
        "non_2xx": result.non_2xx,
        "socket_errors": result.socket_errors,
        "errors": result.errors,
        "cpu_ms_per_request": {k: round(v * 1000 / requests, 4) for k, v in cpu.items()},
        "generator": result.generator,
        "generator_cpu_share": round(result.generator_cpu, 3),
    }


def compared(figures: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """``figures`` with their ratios to ``baseline`` (relay / direct)."""
    return {
        **figures,
        "ratio": ratio(figures["rps"], baseline["rps"]),
        "p50_ratio": ratio(figures["p50_ms"], baseline["p50_ms"]),
        "p99_ratio": ratio(figures["p99_ms"], baseline["p99_ms"]),
    }
