"""The options of one bench run, as one frozen object (the CLI only builds it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MIB = 1024 * 1024
SECTIONS = ("small", "large", "scale", "fanin")
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "latest.json"


@dataclass(frozen=True)
class BenchConfig:
    #: Seconds measured per load point (whole seconds for wrk), and of load before each.
    duration: float = 5.0
    warmup: float = 1.0
    #: Concurrent connections of the small-webhook points.
    concurrency: tuple[int, ...] = (1, 16, 64)
    sections: tuple[str, ...] = SECTIONS
    #: Bytes of each small webhook (a JSON object).
    small_body: int = 1024
    #: Bytes of each large body, up and down.
    large_body: int = 64 * MIB
    #: Idle agents held by one process in the scale scenario.
    agents: int = 1000
    #: Tunnels (one relay-agent process each) receiving traffic at once in the fan-in scenario.
    fanin_tunnels: int = 100
    #: Extra options for every relay-server / relay-agent started (after the bench's own).
    server_args: tuple[str, ...] = ()
    agent_args: tuple[str, ...] = ()
    #: auto (wrk if installed, else the Python generator), wrk or python.
    load_generator: str = "auto"
    #: auto (node if installed, else aiohttp), node or aiohttp.
    target: str = "auto"
    tmp_dir: Path | None = None
    keep_tmp: bool = False
    output: Path = DEFAULT_OUTPUT
    smoke: bool = False


#: What ``--smoke`` changes: a few seconds in all, every scenario, no figure worth reading.
SMOKE = {
    "duration": 0.5,
    "warmup": 0.0,
    "concurrency": (1, 16),
    "large_body": 2 * MIB,
    "agents": 20,
    "fanin_tunnels": 5,
}
