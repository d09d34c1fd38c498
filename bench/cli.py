"""``python -m bench``: translates options into a ``BenchConfig`` and calls ``run.execute``."""

from __future__ import annotations

import argparse
from pathlib import Path

from .config import DEFAULT_OUTPUT, SECTIONS, SMOKE, BenchConfig
from .run import execute

DEFAULTS = BenchConfig()


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated integers, e.g. 1,16,64") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: at least one, each >= 1")
    return values


def _sections(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    bad = [n for n in names if n not in SECTIONS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {','.join(SECTIONS)}")
    return names


def _size(text: str) -> int:
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    factor = units.get(text[-1:], 1)
    try:
        return int(float(text[:-1] if text[-1:] in units else text) * factor)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: bytes, e.g. 67108864 or 64M") from exc


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmarks of relay against a direct baseline measured in the same run: small webhooks"
        " (direct, live, queue), large bodies, idle agents at scale, fan-in. Prints a table and writes"
        " the figures as JSON. Exit 0 when every scenario was measured (goals missed or not), 2 when not.",
    )
    d = DEFAULTS
    p.add_argument("--duration", type=float, help=f"seconds measured per load point ({d.duration:g})")
    p.add_argument(
        "--warmup", type=float, help=f"seconds of load before each point, 0 for none ({d.warmup:g})"
    )
    p.add_argument("--concurrency", type=_ints, help="small-webhook concurrencies (1,16,64)")
    p.add_argument("--only", type=_sections, help=f"scenarios to run ({','.join(SECTIONS)})")
    p.add_argument(
        "--agents", type=int, help=f"idle agents in the scale scenario ({d.agents}; the goal: 10000)"
    )
    p.add_argument(
        "--fanin-tunnels", type=int, help=f"tunnels (agent processes) in fan-in ({d.fanin_tunnels})"
    )
    p.add_argument("--body-size", type=_size, help="bytes of each large body (64M)")
    p.add_argument("--small-body", type=_size, help=f"bytes of each small webhook ({d.small_body})")
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra relay-server serve option, repeatable (--server-arg=--access-log)",
    )
    p.add_argument(
        "--agent-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra relay-agent connect option, repeatable (--agent-arg=--max-concurrency=64)",
    )
    p.add_argument(
        "--load-generator",
        choices=["auto", "wrk", "python"],
        default="auto",
        help="wrk when installed (auto), or the Python fallback",
    )
    p.add_argument(
        "--target",
        choices=["auto", "node", "aiohttp"],
        default="auto",
        help="the local app: node when installed (auto), or aiohttp",
    )
    p.add_argument("--tmp-dir", type=Path, help="where the run's temp dir goes (the system's temp dir)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs, data dirs) afterwards")
    p.add_argument(
        "--output", type=Path, default=DEFAULT_OUTPUT, help="the JSON file (bench/results/latest.json)"
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="a few seconds in all: c=1,16 for 1 s, 2 MiB bodies, 20 agents, 5 fan-in tunnels",
    )
    return p


def config_from(args: argparse.Namespace) -> BenchConfig:
    """Explicit options win, then ``--smoke``'s values, then the defaults."""
    chosen = {
        "duration": args.duration,
        "warmup": args.warmup,
        "concurrency": args.concurrency,
        "sections": args.only,
        "agents": args.agents,
        "fanin_tunnels": args.fanin_tunnels,
        "large_body": args.body_size,
        "small_body": args.small_body,
    }
    values = {**(SMOKE if args.smoke else {}), **{k: v for k, v in chosen.items() if v is not None}}
    return BenchConfig(
        **values,
        server_args=tuple(args.server_arg),
        agent_args=tuple(args.agent_arg),
        load_generator=args.load_generator,
        target=args.target,
        tmp_dir=args.tmp_dir,
        keep_tmp=args.keep_tmp,
        output=args.output,
        smoke=args.smoke,
    )


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    for name in ("duration", "agents", "fanin_tunnels", "body_size", "small_body"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            p.error(f"--{name.replace('_', '-')} must be above 0")
    if args.warmup is not None and args.warmup < 0:
        p.error("--warmup must be 0 or more")
    return execute(config_from(args))
