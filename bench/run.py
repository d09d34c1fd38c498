"""One bench run: start the target, run each scenario in turn, judge, print, write JSON.

The whole run is bounded in time (the sum of the scenarios' budgets, each also bounded
on its own), and whatever it started is stopped by PID at the end, on Ctrl-C, SIGTERM
or an error. A scenario that cannot be measured is reported with its reason and the
others still run; the exit status is then 2.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp

from . import report
from .config import BenchConfig
from .load import pick_generator, pick_transfer_client
from .processes import COMMAND_TIMEOUT, Processes, RunFailed, check_installed, http_session, start_target
from .scenarios import Context, fanin, large, scale, small

SCENARIOS: dict[str, ModuleType] = {"small": small, "large": large, "scale": scale, "fanin": fanin}
#: Seconds for what is not a scenario: the target's start, the JSON, stopping everything.
OVERHEAD = 120.0


def budget(config: BenchConfig) -> float:
    return OVERHEAD + sum(float(SCENARIOS[s].budget(config)) for s in config.sections)


def filesystem_of(path: Path) -> str:
    """The type of the filesystem holding ``path`` (from /proc/mounts), or '?'."""
    best, kind = "", "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and str(path.resolve()).startswith(parts[1]) and len(parts[1]) > len(best):
                best, kind = parts[1], parts[2]
    return kind


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    except (OSError, subprocess.SubprocessError):
        return "?"
    text = (out.stdout or out.stderr).strip().splitlines()
    return " ".join(text[0].split()[:2]) if text else "?"  # "wrk debian/4.1.0-3+b2", "curl 7.88.1"


def _load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


async def _scenarios(config: BenchConfig, processes: Processes, doc: dict[str, Any]) -> bool:
    """Run every selected scenario; True if each produced its figures."""
    generator = pick_generator(config.load_generator)
    client = pick_transfer_client(config.load_generator)
    if generator != "wrk":
        why = "wrk is not installed (apt-get install wrk)" if config.load_generator == "auto" else "asked for"
        print(f"load generator: Python (aiohttp, own process): {why}; its CPU share is shown per point")
    doc["tools"]["load_generator"] = (
        _version(["wrk", "--version"])
        if generator == "wrk"
        else (f"python aiohttp {aiohttp.__version__} (fallback)")
    )
    doc["tools"]["transfer_client"] = (
        _version(["curl", "--version"]) if client == "curl" else (f"python aiohttp {aiohttp.__version__}")
    )
    complete = True
    async with http_session() as http:
        target = await start_target(processes, http, config.target)
        doc["tools"]["target"] = target.version
        print(f"target: {target.version}" + ("" if target.kind == "node" else " (node not found)"))
        ctx = Context(
            config, processes, http, target, generator, client, lambda line: print(line, flush=True)
        )
        for name in config.sections:
            module = SCENARIOS[name]
            print(f"== {name}", flush=True)
            started = time.monotonic()
            try:
                async with asyncio.timeout(module.budget(config)):
                    doc[name] = await module.run(ctx)
                doc[name]["elapsed_s"] = round(time.monotonic() - started, 1)
            except (RunFailed, TimeoutError, OSError, aiohttp.ClientError) as exc:
                complete = False
                reason = str(exc) or type(exc).__name__
                if isinstance(exc, TimeoutError) and not str(exc):
                    reason = f"timed out after {module.budget(config):.0f} s"
                doc[name] = {"error": reason}
                print(f"  {name} could not be measured: {reason}", file=sys.stderr, flush=True)
        await processes.stop([target.child])
    return complete


def execute(config: BenchConfig) -> int:
    """The run; 0 when every selected scenario was measured (goals missed or not), 2 if not."""
    try:
        build = check_installed()
    except RunFailed as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="relay-bench-", dir=config.tmp_dir))
    processes = Processes(base)
    doc: dict[str, Any] = {
        "bench": 1,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(["python -m bench", *sys.argv[1:]]),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(config).items()},
        "machine": {
            "cpus": os.cpu_count(),
            "load_before": _load(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "tmp_filesystem": filesystem_of(base),
        },
        "tools": {"load_generator": "?", "transfer_client": "?", "target": "?", "relay_build": build},
    }
    print(f"temp dir {base} ({filesystem_of(base)}); {os.cpu_count()} CPUs, load {_load()}", flush=True)
    code = 2
    began = time.monotonic()
    try:
        limit = budget(config)

        async def bounded() -> bool:
            # SIGTERM cancels the run as Ctrl-C does: each scenario stops what it started.
            task = asyncio.current_task()
            assert task is not None
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
            async with asyncio.timeout(limit):
                return await _scenarios(config, processes, doc)

        code = 0 if asyncio.run(bounded()) else 2
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("bench: interrupted", file=sys.stderr)
        doc["interrupted"] = True
    except (RunFailed, TimeoutError, OSError, aiohttp.ClientError) as exc:
        print(f"bench: the run could not be made: {exc or type(exc).__name__}", file=sys.stderr)
        doc["error"] = str(exc) or type(exc).__name__
    finally:
        processes.stop_all()
        if config.keep_tmp:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    doc["machine"]["load_after"] = _load()
    doc["elapsed_s"] = round(time.monotonic() - began, 1)
    doc["complete"] = code == 0
    judged = report.goals(doc)
    print()
    print(report.render(doc, judged))
    if doc.get("interrupted"):  # the last complete run's figures stay where they are
        print(f"\ninterrupted: {config.output} left as it was")
        return code
    report.write_json(config.output, doc, judged)
    print(f"\nfigures written to {config.output}")
    return code
