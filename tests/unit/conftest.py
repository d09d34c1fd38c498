"""Fixtures shared by the unit tests."""

from __future__ import annotations

import pytest

from relay_server.tokens import SECRET_ENV


@pytest.fixture(autouse=True)
def _no_secret_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # A RELAY_SECRET in the developer's shell would change which secret the
    # server signs with; every test starts from the data directory's file.
    monkeypatch.delenv(SECRET_ENV, raising=False)
