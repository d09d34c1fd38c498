"""The bench's pure parts: options, payloads, /proc readings, and how goals are judged."""

from __future__ import annotations

import json
import os

import pytest

from bench import cpu, report
from bench.cli import config_from, parser
from bench.load import payload


def test_smoke_values_yield_to_explicit_options() -> None:
    config = config_from(parser().parse_args(["--smoke", "--duration", "2", "--only", "small,scale"]))
    assert config.duration == 2.0
    assert config.concurrency == (1, 16)
    assert config.agents == 20
    assert config.large_body == 2 * 1024 * 1024
    assert config.sections == ("small", "scale")
    plain = config_from(parser().parse_args(["--agents", "10000", "--body-size", "64M"]))
    assert (plain.agents, plain.large_body, plain.concurrency) == (10000, 64 * 1024 * 1024, (1, 16, 64))


def test_repeatable_extra_options_reach_the_config() -> None:
    args = parser().parse_args(
        ["--agent-arg=--no-inspect", "--agent-arg=--max-concurrency=64", "--server-arg=-v"]
    )
    config = config_from(args)
    assert config.agent_args == ("--no-inspect", "--max-concurrency=64")
    assert config.server_args == ("-v",)


def test_payload_is_json_of_the_size_asked() -> None:
    body = payload(1024)
    assert len(body) == 1024
    assert json.loads(body)["event"] == "push"


def test_proc_readings_of_this_process() -> None:
    pid = os.getpid()
    assert cpu.cpu_seconds(pid) > 0
    assert cpu.rss_bytes(pid) > 0
    assert cpu.reset_peak(pid)
    assert cpu.peak_rss_bytes(pid) >= cpu.rss_bytes(pid) - 1024 * 1024


def _point(rps: float, errors: int = 0, p50: float = 0.5) -> dict[str, object]:
    return {"rps": rps, "errors": errors, "p50_ms": p50, "ratio": None, "vs_live": None}


def _small(points: list[tuple[int, float, float, float]]) -> dict[str, object]:
    rows = []
    for c, direct, live, queue in points:
        live_p = {**_point(live), "ratio": live / direct}
        queue_p = {**_point(queue), "ratio": queue / direct, "vs_live": queue / live}
        rows.append({"concurrency": c, "direct": _point(direct), "live": live_p, "queue": queue_p})
    return {"points": rows}


def test_goals_mark_pass_miss_and_unmeasured() -> None:
    doc = {"small": _small([(1, 1000, 300, 200), (16, 4000, 800, 500), (64, 4000, 900, 300)])}
    judged = {g.goal: g for g in report.goals(doc)}
    assert judged["live >= 0.19 x direct at c=16, zero errors"].passed is True
    assert judged["live >= 0.21 x direct at c=64, zero errors"].passed is True
    assert judged["live p50 <= 1 ms at c=1"].passed is True
    assert judged["queue >= 0.5 x live at every concurrency"].passed is False  # 300/900 at c=64
    assert judged["queue req/s not degrading with concurrency"].passed is False  # 500 -> 300
    assert judged["large body up >= 300 MB/s through the relay"].passed is None
    assert report.goals({})[-1].passed is None


def test_a_live_error_misses_its_goal_whatever_the_ratio() -> None:
    doc = {"small": _small([(16, 1000, 900, 800)])}
    doc["small"]["points"][0]["live"]["errors"] = 1  # type: ignore[index]
    judged = {g.goal: g for g in report.goals(doc)}
    assert judged["live >= 0.19 x direct at c=16, zero errors"].passed is False


def _cpu(agent_ms: float, requests: int) -> dict[str, object]:
    return {"requests": requests, "cpu_ms_per_request": {"server": 0.3, "agent": agent_ms, "target": 0.1}}


@pytest.mark.parametrize(
    ("live", "bare", "passed"),
    [
        ([(0.21, 1000), (0.20, 3000)], [(0.20, 1000), (0.20, 3000)], True),  # +1.2%
        ([(0.30, 1000), (0.24, 3000)], [(0.20, 1000), (0.20, 3000)], False),  # +27.5%
        ([(0.19, 1000)], [(0.20, 1000)], True),  # cheaper with it: noise
    ],
)
def test_the_inspector_goal_weighs_the_agents_cpu_by_requests(
    live: list[tuple[float, int]], bare: list[tuple[float, int]], passed: bool
) -> None:
    points = [
        {"concurrency": c, "live": _cpu(*with_it), "bare": _cpu(*without)}
        for c, with_it, without in zip((1, 16, 64), live, bare, strict=False)
    ]
    goal = report.inspector_goal(points)
    assert goal.passed is passed, goal


def test_a_run_without_a_bare_tunnel_does_not_judge_the_inspector() -> None:
    doc = {"small": _small([(16, 1000, 900, 800)])}
    (goal,) = [g for g in report.goals(doc) if g.goal.startswith("inspector")]
    assert goal.passed is None and goal.value == "not measured"
