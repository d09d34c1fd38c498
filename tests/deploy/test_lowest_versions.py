"""Server and agent on the lowest websockets and aiohttp releases ``pyproject.toml`` allows.

The agent uses more of websockets than ``send`` and ``recv``: why it was closed
(``close_code``, ``close_reason``: since 14.1; on 14.0 every disconnect crashed the agent
instead of reconnecting), and for the early send its protocol object, its transport and
``send_data`` (relay_agent/tunnel.py ``_Session._queued``). The server's early send writes
websocket frames beside aiohttp's own writer and relies on ``ws.closed`` being set before
aiohttp's CLOSE goes (relay_server/session.py). So the tests that go through those paths
run again with those releases first on the path of the test and of every relay-server and
relay-agent they start: reconnecting after the server restarts or goes away, 200
requests at once (bursts sent early), and bodies streamed both ways under flow control.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .test_compiled_build import run_suites
from .test_deploy_files import IN_CI

ROOT = Path(__file__).resolve().parents[2]
#: The libraries whose lowest allowed release is run (their ``>=`` in pyproject.toml).
LIBRARIES = ("websockets", "aiohttp")
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
@pytest.mark.timeout(400)  # the install (at most 120 s), then the suites (at most 240 s)
def test_server_and_agent_work_on_the_lowest_allowed_releases(tmp_path: Path) -> None:
    wanted = {name: _lowest(name) for name in LIBRARIES}
    target = tmp_path / "site"
    pip_install = (sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target))
    pins = [f"{name}=={version}" for name, version in wanted.items()]
    install = subprocess.run([*pip_install, *pins], capture_output=True, text=True, timeout=120)
    if install.returncode != 0:
        if IN_CI:
            pytest.fail(f"{pins} could not be installed: {install.stderr[-2000:]}")
        pytest.skip(f"{pins} could not be installed (no package index?)")
    env = {**os.environ, "PYTHONPATH": str(target)}
    probe = "import aiohttp, websockets; print(websockets.__version__, aiohttp.__version__)"
    found = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert list(map(_release, found.stdout.split())) == list(map(_release, wanted.values())), found
    run = run_suites(SUITES, ROOT, env, timeout=240)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
