"""Load: the HTTP load generator (wrk, or a Python fallback) and the big-body transfer client.

Both run in their own process, so their CPU is not the relay's, and that CPU is measured
(wait4): a generator near 100 % of a core is the bottleneck, and its figures say so.

- ``wrk`` (Debian package ``wrk``: ``apt-get install wrk``), one thread (``-t1 -cN``), a Lua
  script for the POST body, the Host header(s) and a count of statuses (202 apart from 200).
- Fallback: ``python -m bench.load http ...``, N aiohttp clients in one process.
- Transfers: ``curl`` (streams the file up, discards the download), else
  ``python -m bench.load transfer ...`` (aiohttp).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .processes import Processes, RunFailed

#: Seconds a request may take before wrk (or the fallback) counts it as a timeout: above
#: the relay's 2 s wait for a free delivery slot in queue mode, so a slow answer is slow,
#: not an error.
REQUEST_TIMEOUT = 10
#: Seconds a generator may run past its duration before the run gives up on it.
GRACE = 30.0
MARKER = "BENCH_JSON "


def payload(size: int) -> bytes:
    """A JSON object of exactly ``size`` bytes (at least 32), like a small webhook."""
    head = {"event": "push", "id": 0, "data": ""}
    pad = size - len(json.dumps(head, separators=(",", ":")))
    head["data"] = "x" * max(0, pad)
    return json.dumps(head, separators=(",", ":")).encode()


def pick_generator(choice: str) -> str:
    """ "wrk" or "python"; ``choice`` is auto, wrk or python."""
    if choice == "python":
        return "python"
    if shutil.which("wrk"):
        return "wrk"
    if choice == "wrk":
        raise RunFailed("--load-generator wrk: wrk is not installed (apt-get install wrk)")
    return "python"


def pick_transfer_client(choice: str) -> str:
    if choice == "python":
        return "python"
    return "curl" if shutil.which("curl") else "python"


@dataclass
class LoadResult:
    """One load point, as the generator saw it."""

    generator: str
    concurrency: int
    seconds: float
    requests: int  # responses received (any status)
    statuses: dict[str, int]
    socket_errors: dict[str, int]  # connect, read, write, timeout
    p50_ms: float
    p99_ms: float
    generator_cpu: float = 0.0  # share of one core the generator used

    @property
    def ok(self) -> int:
        return sum(n for s, n in self.statuses.items() if s.startswith("2"))

    @property
    def non_2xx(self) -> int:
        return sum(n for s, n in self.statuses.items() if not s.startswith("2"))

    @property
    def errors(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())

    @property
    def rps(self) -> float:
        """2xx answers per second (for a queue tunnel: webhooks accepted, 200 or 202)."""
        return self.ok / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class Load:
    """What a load point sends: ``body`` POSTed to ``base + path`` from ``concurrency``
    connections, with the Host header ``hosts[0]``, or each of ``hosts`` in turn."""

    base: str
    path: str
    hosts: tuple[str, ...]
    body: bytes
    concurrency: int


# -- wrk -------------------------------------------------------------------------------------

_WRK_COUNTS = """
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) counts = {} end
function response(status, headers, body) counts[status] = (counts[status] or 0) + 1 end
function done(summary, latency, requests)
  local merged = {}
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("counts")) do merged[k] = (merged[k] or 0) + v end
  end
  local parts = {}
  for k, v in pairs(merged) do parts[#parts + 1] = string.format('"%d":%d', k, v) end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%.0f,"connect":%d,"read":%d,"write":%d,"timeout":%d,'
    .. '"p50_us":%.0f,"p99_us":%.0f,"statuses":{%s}}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99), table.concat(parts, ",")))
end
"""


def _lua_string(data: bytes) -> str:
    return '"' + "".join(f"\\{b}" for b in data) + '"'


def wrk_script(path: str, body: bytes, hosts: list[str]) -> str:
    """The Lua script: POST ``body`` to ``path``; one Host, or a different one for each
    request in turn (fan-in: each connection walks every tunnel)."""
    lines = [
        'wrk.method = "POST"',
        f"wrk.path = {_lua_string(path.encode())}",
        f"wrk.body = {_lua_string(body)}",
        'wrk.headers["Content-Type"] = "application/json"',
        f'wrk.headers["Host"] = {_lua_string(hosts[0].encode())}',
    ]
    if len(hosts) > 1:
        lines += [
            "local hosts = {" + ",".join(_lua_string(h.encode()) for h in hosts) + "}",
            "local turn = 0",
            "function request()",
            "  turn = turn % #hosts + 1",
            '  wrk.headers["Host"] = hosts[turn]',
            "  return wrk.format()",
            "end",
        ]
    return "\n".join(lines) + "\n" + _WRK_COUNTS


async def _wrk(processes: Processes, label: str, load: Load, duration: float) -> LoadResult:
    script = processes.base / f"{label}.lua"
    script.write_text(wrk_script(load.path, load.body, list(load.hosts)))
    argv = [
        "wrk",
        "-t1",
        f"-c{load.concurrency}",
        f"-d{max(1, round(duration))}s",
        "--latency",
        f"--timeout={REQUEST_TIMEOUT}s",
        "-s",
        str(script),
        load.base + load.path,
    ]
    done = await processes.run_to_end(label, argv, duration + GRACE)
    doc = _parse(done.stdout, label, done.returncode)
    seconds = doc["duration_us"] / 1e6
    return LoadResult(
        "wrk",
        load.concurrency,
        seconds,
        doc["requests"],
        {str(k): v for k, v in doc["statuses"].items()},
        {k: doc[k] for k in ("connect", "read", "write", "timeout") if doc[k]},
        doc["p50_us"] / 1000,
        doc["p99_us"] / 1000,
        done.cpu_seconds / done.wall_seconds if done.wall_seconds else 0.0,
    )


def _parse(stdout: str, label: str, returncode: int) -> dict[str, Any]:
    for line in stdout.splitlines():
        if line.startswith(MARKER):
            return dict(json.loads(line[len(MARKER) :]))
    raise RunFailed(f"{label} (exit {returncode}) printed no result:\n{stdout[-2000:]}")


# -- the Python fallback -----------------------------------------------------------------------


async def _python(processes: Processes, label: str, load: Load, duration: float) -> LoadResult:
    body_file = processes.base / f"{label}.body"
    body_file.write_bytes(load.body)
    argv = [
        sys.executable,
        "-m",
        "bench.load",
        "http",
        "--url",
        load.base + load.path,
        "--body-file",
        str(body_file),
        "--concurrency",
        str(load.concurrency),
        "--duration",
        str(duration),
    ]
    for host in load.hosts:
        argv += ["--host", host]
    done = await processes.run_to_end(label, argv, duration + GRACE)
    doc = _parse(done.stdout, label, done.returncode)
    result = LoadResult(**doc)
    result.generator_cpu = done.cpu_seconds / done.wall_seconds if done.wall_seconds else 0.0
    return result


async def http_load(
    processes: Processes, generator: str, label: str, load: Load, duration: float
) -> LoadResult:
    """Run ``load`` for ``duration`` seconds with ``generator`` ("wrk" or "python")."""
    run = _wrk if generator == "wrk" else _python
    return await run(processes, label, load, duration)


async def _python_load(
    url: str, hosts: list[str], body: bytes, concurrency: int, duration: float
) -> LoadResult:
    import aiohttp

    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    turn = 0
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        headers = {"Content-Type": "application/json"}
        start = time.monotonic()
        stop = start + duration

        async def client() -> None:
            nonlocal turn
            while (sent := time.monotonic()) < stop:
                turn += 1
                try:
                    async with session.post(
                        url, data=body, headers={**headers, "Host": hosts[turn % len(hosts)]}
                    ) as r:
                        await r.read()
                        status = str(r.status)
                except TimeoutError:
                    status = "timeout"
                except aiohttp.ClientConnectorError:
                    status = "connect"
                except (aiohttp.ClientError, OSError):
                    status = "read"
                done = time.monotonic()
                if done > stop:
                    return
                if status.isdigit():
                    statuses[status] += 1
                    latencies.append(done - sent)
                else:
                    errors[status] += 1

        await asyncio.gather(*(client() for _ in range(concurrency)))
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1000 if latencies else 0.0

    return LoadResult(
        "python",
        concurrency,
        duration,
        sum(statuses.values()),
        dict(statuses),
        dict(errors),
        pct(50),
        pct(99),
    )


# -- transfers -------------------------------------------------------------------------------


@dataclass
class Transfer:
    """One big body, up or down: what the client saw."""

    status: int
    bytes: int
    seconds: float
    detail: str = ""

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e6 if self.seconds else 0.0


@dataclass
class TransferSeries:
    """Repeated transfers of one kind; the rate is total bytes over total time."""

    transfers: list[Transfer] = field(default_factory=list)

    @property
    def mb_per_s(self) -> float:
        seconds = sum(t.seconds for t in self.transfers)
        return sum(t.bytes for t in self.transfers) / seconds / 1e6 if seconds else 0.0


async def transfer(
    processes: Processes,
    client: str,
    label: str,
    *,
    direction: str,
    url: str,
    host: str,
    size: int,
    body_file: Path,
) -> Transfer:
    """Send ``body_file`` (``size`` bytes) up to ``url``, or fetch ``size`` bytes down from it.
    Raises ``RunFailed`` if the status is not 200 or a byte is missing."""
    timeout = 120.0
    if client == "curl":
        out = processes.base / f"{label}.out"
        argv = [
            "curl",
            "-sS",
            "--max-time",
            str(int(timeout)),
            "-H",
            f"Host: {host}",
            "-w",
            "\\nCURL %{http_code} %{size_upload} %{size_download} %{time_total}\\n",
        ]
        if direction == "up":
            argv += [
                "-X",
                "POST",
                "-T",
                str(body_file),
                "-H",
                "Expect:",
                "-H",
                "Content-Type: application/octet-stream",
                "-o",
                str(out),
                url,
            ]
        else:
            argv += ["-o", "/dev/null", url]
        done = await processes.run_to_end(label, argv, timeout + GRACE)
        lines = [line for line in done.stdout.splitlines() if line.startswith("CURL ")]
        if done.returncode != 0 or not lines:
            raise RunFailed(f"{label}: curl failed (exit {done.returncode}): {done.stdout[-1000:]}")
        _, code, up, down, total = lines[-1].split()
        moved = int(float(up if direction == "up" else down))
        result = Transfer(int(code), moved, float(total))
        if direction == "up":
            result.detail = out.read_text(errors="replace")[:200] if out.exists() else ""
            answered = json.loads(result.detail or "{}").get("length") if result.status == 200 else None
            if answered != size:
                raise RunFailed(f"{label}: the target read {answered} bytes of {size}: {result.detail}")
    else:
        argv = [
            sys.executable,
            "-m",
            "bench.load",
            "transfer",
            "--direction",
            direction,
            "--url",
            url,
            "--host",
            host,
            "--size",
            str(size),
            "--body-file",
            str(body_file),
        ]
        done = await processes.run_to_end(label, argv, timeout + GRACE)
        result = Transfer(**_parse(done.stdout, label, done.returncode))
    if result.status != 200 or result.bytes != size:
        raise RunFailed(f"{label}: status {result.status}, {result.bytes} of {size} bytes {result.detail}")
    return result


async def _python_transfer(direction: str, url: str, host: str, size: int, body_file: Path) -> Transfer:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
        started = time.monotonic()
        if direction == "up":

            async def chunks() -> Any:
                with body_file.open("rb") as f:
                    while chunk := f.read(1 << 20):
                        yield chunk

            headers = {"Host": host, "Content-Length": str(size), "Content-Type": "application/octet-stream"}
            async with session.post(url, data=chunks(), headers=headers) as resp:
                detail = (await resp.read()).decode(errors="replace")[:200]
                answered = json.loads(detail).get("length", 0) if resp.status == 200 else 0
                return Transfer(resp.status, answered, time.monotonic() - started, detail)
        async with session.get(url, headers={"Host": host}) as resp:
            got = 0
            async for chunk in resp.content.iter_chunked(1 << 20):
                got += len(chunk)
            return Transfer(resp.status, got, time.monotonic() - started)


# -- ``python -m bench.load``: the fallback generators, in their own process ------------------


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    http = sub.add_parser("http", help="POST a body from N connections for S seconds")
    http.add_argument("--url", required=True)
    http.add_argument("--host", action="append", required=True, help="Host header; repeat to rotate")
    http.add_argument("--body-file", type=Path, required=True)
    http.add_argument("--concurrency", type=int, required=True)
    http.add_argument("--duration", type=float, required=True)
    move = sub.add_parser("transfer", help="one big body up or down")
    move.add_argument("--direction", choices=["up", "down"], required=True)
    move.add_argument("--url", required=True)
    move.add_argument("--host", required=True)
    move.add_argument("--size", type=int, required=True)
    move.add_argument("--body-file", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "http":
        body = args.body_file.read_bytes()
        result = asyncio.run(_python_load(args.url, args.host, body, args.concurrency, args.duration))
        doc = asdict(result)
    else:
        doc = asdict(
            asyncio.run(_python_transfer(args.direction, args.url, args.host, args.size, args.body_file))
        )
    print(MARKER + json.dumps(doc), flush=True)


if __name__ == "__main__":
    main()
