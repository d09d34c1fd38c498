"""The agent on the lowest websockets release ``pyproject.toml`` allows.

The agent uses more of websockets than ``send`` and ``recv``: why it was closed
(``close_code``, ``close_reason``: since 14.1; on 14.0 every disconnect crashed the agent
instead of reconnecting), and for the early send its protocol object, its transport and
``send_data`` (relay_agent/tunnel.py ``_Session._queued``). So the tests that go through
those paths run again with that release first on the path of every relay-agent they
start: reconnecting after the server restarts or goes away, 200 requests at once (bursts
sent early), and bodies streamed both ways under flow control.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .test_deploy_files import IN_CI

ROOT = Path(__file__).resolve().parents[2]
SUITES = (
    "tests/e2e/test_forwarding.py",
    "tests/e2e/test_streaming.py",
    "tests/e2e/test_resilience.py::test_agent_reconnects_by_itself_after_a_server_restart",
    "tests/e2e/test_resilience.py::test_sigterm_tells_the_agent_going_away_and_it_comes_back",
)


def _lowest(package: str) -> str:
    """The lowest release of ``package`` that pyproject.toml's dependencies allow (its ``>=``)."""
    text = (ROOT / "pyproject.toml").read_text()
    (found,) = re.findall(rf'^\s*"{package}>=([0-9.]+),', text, re.MULTILINE)
    return found


def _release(version: str) -> tuple[int, ...]:
    """``version``'s numbers without trailing zeros: "14" and "14.0" are one release."""
    numbers = [int(part) for part in version.split(".")]
    while numbers and numbers[-1] == 0:
        numbers.pop()
    return tuple(numbers)


@pytest.mark.slow(40)
def test_the_agent_works_on_the_lowest_websockets_release(tmp_path: Path) -> None:
    version = _lowest("websockets")
    target = tmp_path / "site"
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            f"websockets=={version}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if install.returncode != 0:
        if IN_CI:
            pytest.fail(f"websockets {version} could not be installed: {install.stderr[-2000:]}")
        pytest.skip(f"websockets {version} could not be installed (no package index?)")
    env = {**os.environ, "PYTHONPATH": str(target)}
    probe = subprocess.run(
        [sys.executable, "-c", "import websockets; print(websockets.__version__)"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert _release(probe.stdout.strip()) == _release(version), probe
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SUITES],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
