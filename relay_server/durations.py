"""Parse the durations the CLI takes: ``90s``, ``15m``, ``12h``, ``30d``."""

from __future__ import annotations

import re

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"^(\d{1,9})([smhd])$")


def parse_duration(text: str) -> int:
    """Seconds in ``text``; raises ValueError naming the accepted forms."""
    match = _DURATION.match(text.strip())
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"invalid duration {text!r}: use a positive number and s, m, h or d (30d)")
    return int(match.group(1)) * _UNITS[match.group(2)]
