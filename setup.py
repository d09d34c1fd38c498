"""The optional compiled build: ``RELAY_MYPYC=1 pip install .`` compiles the modules every
request runs through (``COMPILED``: the protocol library, the server's ingress, sessions
and deliveries, the agent's tunnel, forwarding and HTTP client) with mypyc, the compiler
that ships with mypy. The same sources run as they are otherwise; the default install
needs no compiler.

Why mypyc and not code of our own: a request's time in each process is the relay's own
Python, spread thin over many layers (docs/performance.md); compiled, server and agent
run 20-25 % fewer instructions per live request. It needs a C compiler and Python's
headers where it is built (it stops at once, naming what is missing), and mypy: pip
fetches it into the build environment (``MYPY``), so the build needs PyPI, or
``--no-build-isolation`` in an environment that has mypy and setuptools 77 or later.
Only ``RELAY_MYPYC=1`` switches it on (not "true"); ``relay-server --version`` says which
build runs. ``RELAY_MYPYC_OPT`` sets the C compiler's optimization level (3 unless set;
the tests build at 0, the same C faster: tests/deploy/test_compiled_build.py).

Everything else about the package is in pyproject.toml.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
import tomllib

from setuptools import setup

#: The modules compiled: what a request or a queued webhook runs through, on both sides.
#: Not compiled, on purpose: modules that run once or rarely (the CLIs, the API, the
#: inspector), and those holding subclasses of library classes that mypyc compiles only
#: as the interpreter's, or not at all: ``relay_server/relayed.py`` and ``ssrf.py``
#: (aiohttp's responses and resolver, ``OSError``), ``relay_web/guard.py`` (aiohttp's
#: connection handler, which has ``__slots__``: the import fails) and
#: ``relay_server/store.py`` (a ``sqlite3.Connection`` subclass: compiled, it crashes).
COMPILED = [
    "relay_protocol/connection.py",
    "relay_protocol/engine.py",
    "relay_protocol/frames.py",
    "relay_protocol/headers.py",
    "relay_protocol/heads.py",
    "relay_protocol/messages.py",
    "relay_server/access.py",
    "relay_server/agent_endpoint.py",
    "relay_server/attempts.py",
    "relay_server/budget.py",
    "relay_server/commits.py",
    "relay_server/concurrency.py",
    "relay_server/connections.py",
    "relay_server/delivery.py",
    "relay_server/dispatcher.py",
    "relay_server/expect.py",
    "relay_server/fragments.py",
    "relay_server/ingress.py",
    "relay_server/metrics.py",
    "relay_server/names.py",
    "relay_server/registry.py",
    "relay_server/session.py",
    "relay_server/states.py",
    "relay_agent/client.py",
    "relay_agent/console.py",
    "relay_agent/forward.py",
    "relay_agent/pool.py",
    "relay_agent/tunnel.py",
]

#: Appended to the C compiler's flags. Python's own (sysconfig's CFLAGS) carry ``-Wall``,
#: whose checks cost gcc 82 of the 98 s it took for mypyc's one 24 MB C file at ``-O0``
#: (16 s without them, 2026-12-08); the C is generated, and its style warnings are mypyc's
#: business. The checks that find real faults stay errors (mypyc adds ``-Werror``, and
#: ``-Wno-all`` would turn them off too, ``implicit-function-declaration`` included): a
#: call to an undeclared function, a function that runs off its end without a value, an
#: integer taken for a pointer. gcc and clang both take them.
C_FLAGS = (
    "-Wno-all",
    "-Werror=implicit-function-declaration",
    "-Werror=return-type",
    "-Werror=int-conversion",
    "-Werror=incompatible-pointer-types",
)

#: The mypy (with mypyc) the compiled build is made with: the releases it was tested with.
MYPY = "mypy>=1.11,<3"


def build_requirements() -> list[str]:
    """What the compiled build needs where it is built: mypy, and the package's own
    dependencies (pyproject.toml), whose types mypyc compiles against. Without aiohttp
    there, an isolated build (pip's default) saw its classes as ``Any`` and stopped."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "pyproject.toml"), "rb") as file:
        return [MYPY, *tomllib.load(file)["project"]["dependencies"]]


def _check_toolchain() -> None:
    """Stop the build, naming what is missing, before mypyc and the C compiler run."""
    compiler = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    missing = []
    if not shutil.which(compiler):
        missing.append(f"a C compiler ({compiler})")
    if not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
        missing.append("Python's headers (Python.h)")
    if missing:
        sys.exit(
            f"RELAY_MYPYC=1: the compiled build needs {' and '.join(missing)}: "
            "apt-get install gcc python3-dev, or install without RELAY_MYPYC"
        )


#: setuptools' commands for an editable install (``pip install -e``), which runs the
#: sources where they are: compiled modules beside them would shadow every edit.
EDITABLE = ("editable_wheel", "develop")
#: The commands by which the build backend only asks for metadata and build requirements:
#: nothing is compiled for them (mypycify writes its C sources as soon as it is called).
QUESTIONS = ("egg_info", "dist_info")

options: dict[str, object] = {}
if os.environ.get("RELAY_MYPYC") == "1":
    if any(command in sys.argv for command in EDITABLE):
        print("RELAY_MYPYC=1 ignored: an editable install runs the sources as they are", file=sys.stderr)
    else:
        # setup_requires is how setuptools' build backend asks pip for mypy (and the
        # dependencies) in an isolated build, in a first pass that runs without them.
        options["setup_requires"] = build_requirements()
        if not any(command in sys.argv for command in QUESTIONS):
            level = os.environ.get("RELAY_MYPYC_OPT", "3")
            if level not in ("0", "1", "2", "3"):
                sys.exit(f"RELAY_MYPYC_OPT={level!r}: the C compiler's optimization level is 0, 1, 2 or 3")
            _check_toolchain()
            from mypyc.build import mypycify

            extensions = mypycify(COMPILED, opt_level=level)
            for extension in extensions:  # a list of each one's own: mypyc may share one
                extension.extra_compile_args = [*extension.extra_compile_args, *C_FLAGS]
            options["ext_modules"] = extensions

setup(**options)
