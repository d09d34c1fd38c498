"""Who may import whom (docs in DESIGN.md): checked, not hoped for.

relay_protocol stays free of I/O libraries; relay_server and relay_agent both
use relay_protocol (and relay_web, what their aiohttp servers share) and never each
other; relay_web uses neither of them.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FORBIDDEN_IN_PROTOCOL = ("asyncio", "aiohttp", "websockets")


def test_relay_protocol_imports_no_io_libraries() -> None:
    code = (
        "import json, sys\n"
        "import relay_protocol, relay_protocol.headers\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    loaded = json.loads(result.stdout)
    assert "relay_protocol.connection" in loaded  # the import really happened
    offending = [
        name
        for name in loaded
        if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN_IN_PROTOCOL)
    ]
    assert offending == []


def _module_name(path: Path) -> tuple[str, bool]:
    """Dotted module name of a file under ROOT, and whether it is a package's __init__."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def _imports_in(source: bytes, module: str, is_package: bool) -> set[str]:
    """Absolute names of every module ``source`` imports, at any depth of its code."""
    tree = ast.parse(source)
    package = module.split(".") if is_package else module.split(".")[:-1]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                prefix = ".".join(package[: len(package) - (node.level - 1)])
                base = f"{prefix}.{node.module}" if node.module else prefix
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__"))
            )
        ):
            names.add(node.args[0].value)
    return names


def _violations(package: str, other: str) -> list[str]:
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        module, is_package = _module_name(path)
        for name in sorted(_imports_in(path.read_bytes(), module, is_package)):
            if name == other or name.startswith(other + "."):
                found.append(f"{path.relative_to(ROOT)} imports {name}")
    return found


@pytest.mark.parametrize(
    ("package", "other"),
    [
        ("relay_server", "relay_agent"),
        ("relay_agent", "relay_server"),
        ("relay_protocol", "relay_server"),
        ("relay_protocol", "relay_agent"),
        ("relay_protocol", "relay_web"),
        ("relay_web", "relay_server"),
        ("relay_web", "relay_agent"),
        ("relay_web", "relay_protocol"),
    ],
)
def test_forbidden_imports(package: str, other: str) -> None:
    assert _violations(package, other) == []


def test_the_import_scanner_sees_every_form() -> None:
    # Guard against a scanner that passes because it finds nothing.
    source = b"""
import relay_agent
import relay_agent.cli as c
from relay_agent import connect
from relay_agent.forward import x
from ... import relay_agent as top
def f():
    import relay_agent.inspector
    importlib.import_module("relay_agent.late")
"""
    names = _imports_in(source, "relay_server.api.routes", is_package=False)
    assert {
        "relay_agent",
        "relay_agent.cli",
        "relay_agent.connect",
        "relay_agent.forward",
        "relay_agent.inspector",
        "relay_agent.late",
    } <= names
    assert "relay_agent" in {n for n in names if not n.startswith("relay_server")}
    # Relative imports resolve inside the importing package.
    assert _imports_in(b"from .ingress import app", "relay_server.delivery", False) >= {
        "relay_server.ingress",
        "relay_server.ingress.app",
    }
    assert _imports_in(b"from . import store", "relay_server", True) == {
        "relay_server",
        "relay_server.store",
    }
