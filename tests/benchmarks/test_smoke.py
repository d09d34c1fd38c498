"""``python -m bench --smoke`` runs every scenario on real processes and writes its JSON.

No speed figure is asserted (timings on a shared machine are not tests): only that the
run was made, that every section holds figures, and that what the figures count adds up.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent


@pytest.mark.slow(25)
def test_smoke_run_measures_every_scenario_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "results" / "latest.json"
    try:
        result = subprocess.run(
            [sys.executable, "-m", "bench", "--smoke", "--output", str(out), "--tmp-dir", str(tmp_path)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=100,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the smoke run took over 100 s:\n{exc.stdout!s:.4000}\n{exc.stderr!s:.4000}")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    doc = json.loads(out.read_text())
    assert doc["complete"] is True
    for section in ("small", "large", "scale", "fanin"):
        assert section in doc and "error" not in doc[section], doc.get(section)
    assert list(tmp_path.glob("relay-bench-*")) == [], "the temp dir was not removed"

    small = doc["small"]
    assert [p["concurrency"] for p in small["points"]] == [1, 16]
    for p in small["points"]:
        for path in ("direct", "live", "bare", "floor", "queue"):
            assert p[path]["requests"] > 0, (path, p[path])
        for path in ("live", "bare", "floor", "queue"):
            assert p[path]["ratio"] is not None
            assert set(p[path]["cpu_ms_per_request"]) == {"server", "agent", "target"}
        assert p["floor"]["errors"] == 0, p["floor"]
        assert p["live"]["vs_floor"] is not None and p["bare"]["vs_floor"] is not None
        assert p["queue"]["lost"] == 0, p["queue"]

    large = doc["large"]
    assert large["bytes"] == 2 * 1024 * 1024
    for direction in ("up", "down"):
        relay = large[direction]["relay"]
        assert relay["transfers"] >= 1 and relay["mb_per_s"] > 0
        assert set(relay["rss"]) == {"server", "agent"}

    scale = doc["scale"]
    assert scale["agents"] == 20 and scale["connected"] == 20 and scale["failed"] == 0
    assert scale["server_fds"] >= 20

    fanin = doc["fanin"]
    assert fanin["tunnels"] == 5
    assert fanin["relay"]["requests"] > 0 and fanin["direct"]["requests"] > 0

    goals = {g["goal"]: g for g in doc["goals"]}
    assert any(g.startswith("live >= 0.19") for g in goals)
    assert any(g.startswith("inspector costs the agent") for g in goals)
    assert "Goals" in result.stdout and "Small webhooks" in result.stdout
