"""Agent-side errors, under the one tree of ``relay_protocol.errors``."""

from __future__ import annotations

from relay_protocol.errors import RelayError


class AgentConfigError(RelayError):
    """An option or the saved login is unusable; the message says which and why."""


class InvalidTarget(AgentConfigError):
    """``--forward`` is not a local service the agent can dial; ``why`` says what is wrong."""

    def __init__(self, text: str, why: str) -> None:
        super().__init__(f"invalid --forward {text!r}: {why}")
        self.why = why


class Refused(RelayError):
    """The server refused this agent for good (bad token, name taken, version): never retried."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{reason} (close code {code})")
        self.code = code
        self.reason = reason
