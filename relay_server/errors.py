"""Server-side errors, under the one tree of ``relay_protocol.errors``."""

from __future__ import annotations

from relay_protocol.errors import RelayError


class ConfigError(RelayError):
    """An option or the data directory is unusable; the message names which and why."""


class AuthError(RelayError):
    """A token is missing, malformed, expired, revoked or signed with another secret."""


class NameRefused(RelayError):
    """A tunnel name is invalid, not granted by the token, or owned by another user."""


class StoreError(RelayError):
    """The store could not be opened or written (disk full, bad file, locked)."""


class StoreFull(StoreError):
    """The store reached its size cap (``--store-max-bytes``) or the disk is full,
    and no finished event was left to purge."""


class NoRoomForEvents(StoreFull):
    """New events filled their share of ``--store-max-bytes``: the rest is kept for the
    outcomes of the events already waiting (``relay_server.store.RECORD_RESERVE``)."""
