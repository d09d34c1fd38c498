"""The compiled build (``RELAY_MYPYC=1``, setup.py): the protocol library compiled with
mypyc behaves as its sources do.

mypyc checks declared types at run time and handles some Python features its own way
(a dataclass's ClassVar, for one: mypyc/mypyc#1122), so the compiled modules are run
through the protocol's tests and the real server and agent, in a copy of the tree built
in place: what a user gets from ``RELAY_MYPYC=1 pip install .``.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from .test_deploy_files import IN_CI, _tool

ROOT = Path(__file__).resolve().parents[2]
#: What the build needs from the tree, and what the tests below run and read.
TREE = (
    "relay_protocol",
    "relay_web",
    "relay_server",
    "relay_agent",
    "tests",
    "docs",
    "setup.py",
    "pyproject.toml",
    "README.md",
)
#: Run against the compiled modules: the protocol's own tests; the real relay-server and
#: relay-agent relaying requests, refusing a hostile agent's frames (the decoder's errors
#: must stay ProtocolError, never a TypeError of a compiled signature), and streaming
#: bodies under flow control (memoryview slices through the engine).
SUITES = (
    "tests/protocol",
    "tests/e2e/test_forwarding.py",
    "tests/e2e/test_hostile_agent.py",
    "tests/e2e/test_streaming.py",
)


def _compiled_modules() -> list[str]:
    """The modules setup.py compiles (its ``COMPILED``), as dotted names."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    (paths,) = (
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "COMPILED" for t in node.targets)
    )
    return [path.removesuffix(".py").replace("/", ".") for path in paths]


def run_suites(suites: tuple[str, ...], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run pytest on ``suites`` in a child process (``cwd``, ``env``: a path that puts other
    modules first), its output kept for the caller's assertion."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *suites],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _copy(to: Path) -> None:
    skip = shutil.ignore_patterns("__pycache__", "*.so", ".pytest_cache")
    for name in TREE:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, to / name, ignore=skip)
        else:
            shutil.copy2(source, to / name)


@pytest.mark.slow(45)
def test_the_compiled_protocol_library_passes_the_protocol_and_relay_tests(tmp_path: Path) -> None:
    pytest.importorskip("mypyc", reason="mypyc comes with mypy, a test dependency")
    _tool("cc")  # and Python's headers: .ci/run installs both (gcc, python3-dev)
    if not Path(sysconfig.get_paths()["include"], "Python.h").exists():
        if IN_CI:
            pytest.fail("Python.h is missing: .ci/run installs python3-dev, and CI must run this test")
        pytest.skip("Python's headers are not installed (python3-dev): nothing can be compiled")
    tree = tmp_path / "relay"
    tree.mkdir()
    _copy(tree)
    env = {k: v for k, v in os.environ.items() if k != "RELAY_MYPYC"}
    # Built as ``RELAY_MYPYC=1 pip install .`` builds it (setup.py through setuptools'
    # build backend), with this environment's setuptools and mypy: no download.
    pip_wheel = (sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps")
    build = subprocess.run(
        [*pip_wheel, "-w", str(tmp_path / "wheel"), str(tree)],
        cwd=tmp_path,
        env={**env, "RELAY_MYPYC": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("relay-*.whl")
    assert "-none-any" not in wheel.name, wheel.name  # a platform wheel: compiled
    with zipfile.ZipFile(wheel) as archive:  # its extension modules beside the sources
        archive.extractall(tree, [name for name in archive.namelist() if name.endswith(".so")])

    # The copy comes first on the path of this Python and of every relay-server and
    # relay-agent the tests start (their console scripts are this environment's).
    env["PYTHONPATH"] = str(tree)
    modules = _compiled_modules()
    probe = f"import importlib\nfor name in {modules!r}: print(importlib.import_module(name).__file__)"
    found = subprocess.run(
        [sys.executable, "-c", probe], cwd=tree, env=env, capture_output=True, text=True, timeout=60
    )
    assert found.returncode == 0, found.stderr
    files = found.stdout.split()
    assert len(files) == len(modules) == 5, files
    assert all(f.startswith(str(tree)) and f.endswith(".so") for f in files), files
    server = "import sys; from relay_server.cli import main; sys.exit(main())"
    version = subprocess.run(
        [sys.executable, "-c", server, "--version"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "(protocol library: compiled with mypyc)" in version.stdout, version

    run = run_suites(SUITES, tree, env)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]


@pytest.mark.parametrize("command", ["relay-server", "relay-agent"])
def test_version_says_which_build_runs(command: str) -> None:
    # The development install runs the sources: plain Python.
    result = subprocess.run(
        [str(Path(sys.executable).parent / command), "--version"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{command}, version ")
    assert result.stdout.rstrip().endswith("(protocol library: plain Python)"), result.stdout
