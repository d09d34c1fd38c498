"""Command-line option types that ``relay-server`` and ``relay-agent`` share."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


class Seconds(click.FloatRange):
    """A number of seconds within ``min``..``max``: ``click.FloatRange``, which lets
    ``nan`` through (every comparison with it is false), and ``inf`` when there is no
    ``max``; a timer given either fails only later, at its first use."""

    name = "seconds"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        seconds = super().convert(value, param, ctx)
        if not math.isfinite(seconds):
            self.fail(f"{value!r} is not a finite number of seconds", param, ctx)
        return seconds


def version_option(build: str) -> Callable[[F], F]:
    """``--version`` of both commands: the package's version, and which build runs
    (``relay_protocol.BUILD``: compiled with mypyc, or plain Python)."""
    return click.version_option(package_name="relay", message=f"%(prog)s, version %(version)s ({build})")
