"""Fixtures of the end-to-end suite; the machinery lives in ``framework.py``.

``relay`` (per test) and ``module_relay`` (per module, for tests that share one running
stack) start real processes under a temp dir and kill every one of them by PID at teardown.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from .framework import RELAY_AGENT, RELAY_SERVER, Relay, client_session
from .streaming_targets import StreamingTarget


def _check_scripts() -> None:
    for script in (RELAY_SERVER, RELAY_AGENT):
        assert script.exists(), f"{script} is missing: install the package (pip install -e .)"


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Relay]:
    _check_scripts()
    stack = Relay(tmp_path)
    try:
        yield stack
    finally:
        stack.close()


@pytest.fixture(scope="module")
def module_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    _check_scripts()
    stack = Relay(tmp_path_factory.mktemp("relay"))
    try:
        yield stack
    finally:
        stack.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with client_session() as session:
        yield session


@pytest.fixture
def target() -> Iterator[StreamingTarget]:
    """The websocket, event-stream and big-body service of the streaming tests."""
    service = StreamingTarget()
    service.start()
    try:
        yield service
    finally:
        service.stop()
