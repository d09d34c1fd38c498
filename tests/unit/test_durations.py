"""``parse_duration``: the token lifetimes the CLI takes."""

from __future__ import annotations

import pytest

from relay_server.durations import parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("15m", 15 * 60),
        ("12h", 12 * 3600),
        ("30d", 30 * 86400),
        ("1s", 1),
        ("365d", 365 * 86400),
        (" 30d ", 30 * 86400),
        ("007m", 7 * 60),
    ],
)
def test_good_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "30",  # a unit is required
        "d",
        "0s",  # not positive
        "0d",
        "-5m",
        "+5m",
        "1.5h",
        "30D",
        "30 d",
        "30days",
        "1w",
        "1h30m",
        "30d\nx",
        "1234567890s",  # over nine digits
    ],
)
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)
