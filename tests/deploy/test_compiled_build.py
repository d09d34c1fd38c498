"""The compiled build (``RELAY_MYPYC=1``, setup.py): the modules compiled with mypyc behave
as their sources do.

mypyc checks declared types at run time and handles some Python features its own way
(a dataclass's ClassVar, for one: mypyc/mypyc#1122), so the compiled modules are run
through the protocol's tests and the real server and agent, in a copy of the tree built
in place: what a user gets from ``RELAY_MYPYC=1 pip install .``.
"""

from __future__ import annotations

import ast
import enum
import importlib
import inspect
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest
from e2e.framework import PORT_BLOCKS_FROM

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
#: must stay ProtocolError, never a TypeError of a compiled signature), streaming bodies
#: under flow control (memoryview slices through the engine), queueing and delivering
#: webhooks, relaying websockets (a ping's payload came as a bytearray) and the app's
#: answers byte for byte, broken ones included (their errors cross every compiled layer).
#: The whole suite passed against the compiled build when it was widened (2026-12-08);
#: its unit tests that hand the relay stand-ins for its own objects cannot. Of the queue's
#: 28 tests (a third of what this test cost, 66 s of CPU on their own), twelve that take
#: the main paths a webhook can: answered inline, queued and delivered later, retried,
#: dead at once (410), dead and replayed, refused over quota (429), its agent killed
#: mid-request, its sender gone, the store failing, fanned out, held to a fixed concurrency.
#: Not taken: Retry-After, bodies over the queue limit going live, adaptive concurrency,
#: connect-mode live (the whole suite runs them against the sources).
QUEUE_TESTS = (
    "test_transparent_when_the_app_is_up",
    "test_offline_webhooks_are_queued_then_delivered_in_arrival_order",
    "test_app_answering_503_is_retried_until_it_recovers",
    "test_410_gone_makes_the_event_dead_at_once",
    "test_exhausted_event_is_dead_and_replay_delivers_it",
    "test_full_quota_answers_429_and_drops_nothing",
    "test_app_down_or_too_slow_gives_202_and_it_is_delivered_later",
    "test_agent_killed_mid_request_gives_202_and_the_next_agent_gets_it",
    "test_a_sender_that_gives_up_does_not_strand_its_event",
    "test_a_full_store_answers_503_never_a_false_2xx_and_recovers",
    "test_max_concurrency_bounds_deliveries_in_flight",
    "test_fan_out_delivers_every_event_to_every_destination",
)
SUITES = (
    "tests/protocol",
    "tests/e2e/test_forwarding.py",
    "tests/e2e/test_hostile_agent.py",
    "tests/e2e/test_streaming.py",
    *(f"tests/e2e/test_queue.py::{name}" for name in QUEUE_TESTS),
    "tests/e2e/test_websocket.py",
    "tests/e2e/test_agent_fidelity.py",
)


def _setup_constant(name: str) -> Any:
    """The literal setup.py assigns to ``name`` (setup.py is a script: not imported)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    (value,) = (
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == name for t in node.targets)
    )
    return value


def _compiled_modules() -> list[str]:
    """The modules setup.py compiles (its ``COMPILED``), as dotted names."""
    return [path.removesuffix(".py").replace("/", ".") for path in _setup_constant("COMPILED")]


#: Seconds for the wheel's build (30-100 s here), then for the suites' run (about 120 s
#: alone): together under the test's own timeout, so that a slow day fails with the
#: child's output, not the outer timeout's kill.
BUILD_TIMEOUT = 240
SUITES_TIMEOUT = 330


def run_suites(
    suites: tuple[str, ...], cwd: Path, env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run pytest on ``suites`` in a child process (``cwd``, ``env``: a path that puts other
    modules first) for at most ``timeout`` seconds (less than what is left of the caller's
    own, so that a slow run fails with the child's output), its output kept for the
    caller's assertion. The child takes the port block past this run's workers' (it
    inherits its worker's ``gwN``)."""
    env = {**env, PORT_BLOCKS_FROM: os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *suites],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _copy(to: Path) -> None:
    skip = shutil.ignore_patterns("__pycache__", "*.so", ".pytest_cache")
    for name in TREE:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, to / name, ignore=skip)
        else:
            shutil.copy2(source, to / name)


@pytest.mark.slow(150)
@pytest.mark.timeout(600)
def test_the_compiled_build_passes_the_protocol_and_relay_tests(tmp_path: Path) -> None:
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
        # At the C compiler's -O0: the same C, built in two thirds of the time.
        env={**env, "RELAY_MYPYC": "1", "RELAY_MYPYC_OPT": "0"},
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
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
    assert len(files) == len(modules) > 20, files
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
    assert "(compiled with mypyc)" in version.stdout, version

    run = run_suites(SUITES, tree, env, SUITES_TIMEOUT)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]


#: C the build's flags must refuse (mypyc compiles with ``-Werror``; ``-Wno-all``, which
#: spares gcc most of the build's time, would let each of these through).
FAULTY_C = {
    "undeclared function": "int f(void) { return undeclared(1); }",
    "no value returned": "int f(int x) { if (x) return 1; }",
    "integer taken for a pointer": "char *f(long x) { return x; }",
    "incompatible pointer": "int *f(char *p) { return p; }",
}


@pytest.mark.parametrize("fault", sorted(FAULTY_C))
def test_the_build_flags_still_refuse_c_with_real_faults(fault: str, tmp_path: Path) -> None:
    cc = _tool("cc")
    flags = [*sysconfig.get_config_var("CFLAGS").split(), "-O0", "-Werror", *_setup_constant("C_FLAGS")]
    assert "-Wno-all" in flags  # what this test is about
    source = tmp_path / "unit.c"
    for text, refused in (("int f(int x) { return x + 1; }", False), (FAULTY_C[fault], True)):
        source.write_text(text + "\n")
        built = subprocess.run(
            [cc, *flags, "-c", str(source), "-o", str(tmp_path / "unit.o")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert (built.returncode != 0) == refused, (text, built.stderr)


def test_an_isolated_build_gets_the_dependencies_mypyc_compiles_against() -> None:
    # pip builds in an environment of its own: with mypy alone there, aiohttp's classes
    # were Any to mypyc and RELAY_MYPYC=1 pip install . stopped (make bench-compiled found
    # it; the test above builds without isolation, in this environment, and could not).
    tree = ast.parse((ROOT / "setup.py").read_text())
    wanted = {"MYPY", "build_requirements"}
    parts = [n for n in tree.body if getattr(n, "name", None) in wanted or _assigns(n, wanted)]
    scope: dict[str, object] = {"__file__": str(ROOT / "setup.py"), "os": os, "tomllib": tomllib}
    exec(compile(ast.Module(body=parts, type_ignores=[]), "setup.py", "exec"), scope)
    with (ROOT / "pyproject.toml").open("rb") as file:
        dependencies = tomllib.load(file)["project"]["dependencies"]
    requirements = scope["build_requirements"]()  # type: ignore[operator]
    assert requirements == [scope["MYPY"], *dependencies]
    assert "build_requirements()" in (ROOT / "setup.py").read_text()  # what setup_requires gets


def _assigns(node: ast.stmt, names: set[str]) -> bool:
    return isinstance(node, ast.Assign) and any(getattr(t, "id", None) in names for t in node.targets)


def _own_nodes(function: ast.FunctionDef | ast.AsyncFunctionDef) -> list[ast.AST]:
    """The nodes of ``function``'s body, not those of functions and classes inside it."""
    nodes: list[ast.AST] = []
    todo: list[ast.AST] = list(function.body)
    while todo:
        node = todo.pop()
        nodes.append(node)
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef):
            todo.extend(ast.iter_child_nodes(node))
    return nodes


def _compiled_functions() -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Every function of the compiled modules, with its file's name."""
    functions = []
    for module in _compiled_modules():
        path = ROOT / (module.replace(".", "/") + ".py")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                functions.append((f"{path.name}:{node.lineno}", node))
    return functions


def test_no_compiled_function_gives_an_exception_a_name_it_uses_for_anything_else() -> None:
    # mypyc gives a local one type: ``except Refused as exc`` then ``except StreamFailed
    # as exc`` in one function made the second a TypeError, and the relay answered 500
    # where it owed a 502 (found running the whole suite against the compiled build);
    # ``except Refused as refused`` beside ``refused := ...`` (a response) the same (a review).
    clashes = []
    for where, function in _compiled_functions():
        nodes = _own_nodes(function)
        kinds: dict[str, set[str]] = {}
        for node in nodes:
            if isinstance(node, ast.ExceptHandler) and node.name:
                kinds.setdefault(node.name, set()).add(
                    ast.unparse(node.type) if node.type else "BaseException"
                )
        bound = {arg.arg for arg in ast.walk(function.args) if isinstance(arg, ast.arg)}
        bound |= {n.id for n in nodes if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        for name, k in kinds.items():
            if len(k) > 1 or name in bound:
                clashes.append(
                    f"{where} {name}: {sorted(k)}{' and bound otherwise' if name in bound else ''}"
                )
    assert not clashes, clashes


def test_no_compiled_handler_reraises_bare_after_an_await() -> None:
    # Compiled by mypyc, ``except Exception: await ...; raise`` crashed the process
    # (a segmentation fault: the webhook whose insert failed with a bug, cut short, then
    # re-raised); ``raise exc``, with the exception named, does not.
    found = []
    for where, function in _compiled_functions():
        for handler in (n for n in _own_nodes(function) if isinstance(n, ast.ExceptHandler)):
            inside = [n for statement in handler.body for n in ast.walk(statement)]
            awaits = any(isinstance(n, ast.Await | ast.AsyncFor | ast.AsyncWith) for n in inside)
            if awaits and any(isinstance(n, ast.Raise) and n.exc is None for n in inside):
                found.append(f"{where} line {handler.lineno}")
    assert not found, found


def _unextendable(base: type) -> str | None:
    """Why a class mypyc compiles may not extend ``base`` (its docs, "Native classes"), or None."""
    if base is object or base.__module__ == "typing":  # Generic, Protocol: mypyc's own
        return None
    if base.__module__ == "builtins":  # dict and the exceptions it takes; the rest fail to compile
        return None if base is dict or issubclass(base, BaseException) else "a builtin type"
    try:
        inspect.getsource(base)
    except (TypeError, OSError):  # a C type: compiled, it crashed (sqlite3.Connection, CIMultiDict)
        return "a C type"
    if getattr(base, "__slots__", ()):  # the import fails (aiohttp's RequestHandler)
        return "a class with __slots__"
    return None


def test_no_compiled_class_extends_a_type_mypyc_cannot() -> None:
    # The store's sqlite3.Connection subclass and the agent's CIMultiDict one compiled
    # without a word from mypyc, then crashed the process (found running the suite
    # against the compiled build); such classes live in modules left as they are.
    compiled = set(_compiled_modules())
    problems = []
    for name in compiled:
        module = importlib.import_module(name)
        for value in vars(module).values():
            # (mypyc leaves an enum a class of the interpreter's: IntEnum's int is no matter)
            if isinstance(value, type) and value.__module__ == name and not issubclass(value, enum.Enum):
                for base in value.__mro__[1:]:
                    if base.__module__ not in compiled and (why := _unextendable(base)):
                        problems.append(f"{name}.{value.__name__} extends {base.__qualname__}: {why}")
    assert not problems, problems


@pytest.mark.parametrize("command", ["relay-server", "relay-agent"])
def test_version_says_which_build_runs(command: str) -> None:
    # The development install runs the sources: plain Python.
    result = subprocess.run(
        [str(Path(sys.executable).parent / command), "--version"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{command}, version ")
    assert result.stdout.rstrip().endswith("(plain Python)"), result.stdout
