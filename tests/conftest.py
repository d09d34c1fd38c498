"""Suite-wide hooks."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Spread the tests marked ``slow(SECONDS)`` so that every pytest-xdist worker starts
    on its share of them, longest first.

    ``--dist worksteal`` first cuts the collection into one contiguous block per worker
    (the first gets ``len // n``, the next ``rest // (n - 1)``, ...), then idle workers
    steal from the back of the longest queue. So each block is built as: its slow tests,
    then a run of the others in collection order. Without xdist, slow tests just go first.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))

    def seconds(item: pytest.Item) -> float:
        marker = item.get_closest_marker("slow")
        return float(marker.args[0]) if marker and marker.args else (1.0 if marker else 0.0)

    slow = sorted((i for i in items if seconds(i)), key=seconds, reverse=True)
    rest = [i for i in items if not seconds(i)]
    ordered: list[pytest.Item] = []
    left = len(items)
    for worker in range(workers):
        size = left // (workers - worker)
        share = slow[worker::workers]
        take = max(0, size - len(share))
        ordered += share + rest[:take]
        rest = rest[take:]
        left -= len(share) + take
    items[:] = ordered + rest
