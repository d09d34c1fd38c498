"""The optional compiled build: ``RELAY_MYPYC=1 pip install .`` compiles the protocol
library (``relay_protocol``'s frame codec, heads, stream states, engine and header rules)
with mypyc, the compiler that ships with mypy. The same sources run as they are
otherwise; the default install needs no compiler.

Why mypyc and not code of our own: every live request crosses this library four times
(two frames each way, encoded and decoded); compiled, a protocol round trip takes half
the time and live req/s rise 12-16 % (docs/performance.md). It needs a C compiler and
Python's headers where it is built (it stops at once, naming what is missing), and
mypy: pip fetches it into the build environment (``MYPY``), so the build needs PyPI, or
``--no-build-isolation`` in an environment that has mypy and setuptools 77 or later.
Only ``RELAY_MYPYC=1`` switches it on (not "true"); ``relay-server --version`` says which
build runs.

Everything else about the package is in pyproject.toml.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig

from setuptools import setup

#: The modules compiled: what every request runs through, on both sides.
COMPILED = [
    "relay_protocol/connection.py",
    "relay_protocol/engine.py",
    "relay_protocol/frames.py",
    "relay_protocol/headers.py",
    "relay_protocol/heads.py",
]

#: The mypy (with mypyc) the compiled build is made with: the releases it was tested with.
MYPY = "mypy>=1.11,<3"


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
        # setup_requires is how setuptools' build backend asks pip for mypy in an isolated
        # build, in a first pass that runs without it.
        options["setup_requires"] = [MYPY]
        if not any(command in sys.argv for command in QUESTIONS):
            _check_toolchain()
            from mypyc.build import mypycify

            options["ext_modules"] = mypycify(COMPILED, opt_level="3")

setup(**options)
