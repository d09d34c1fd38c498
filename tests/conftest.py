"""Suite-wide hooks."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``slow(SECONDS)`` first, longest first (in collection order otherwise):
    with pytest-xdist handing tests out in this order (``--dist load``), each worker starts
    on a long one and the suite does not end waiting on a single 45 s test."""

    def expected(item: pytest.Item) -> float:
        marker = item.get_closest_marker("slow")
        return -float(marker.args[0]) if marker and marker.args else (-1.0 if marker else 0.0)

    items.sort(key=expected)
