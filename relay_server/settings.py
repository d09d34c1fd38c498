"""Tunnel settings: stored on the server, so they hold while the agent is away."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError

MODES = ("queue", "live")
#: Statuses of the local service that mean "not now, try again later".
DEFAULT_RETRY_ON = (429, 502, 503, 504)
#: Upper bound of --max-concurrency: a tunnel must not pin every stream of its agent.
MAX_CONCURRENCY_LIMIT = 256
#: ``max_concurrency`` of a tunnel that leaves its delivery slots to the relay (the
#: default): 8 to 64, more while the app keeps answering as fast (concurrency.py).
AUTO = "auto"
#: Destinations of one tunnel (fan-out).
MAX_DESTINATIONS = 16
#: The destination of a tunnel that names none: whichever agent serves it.
ANY_AGENT = "agent:*"


@dataclass(frozen=True)
class TunnelSettings:
    mode: str = "queue"
    retry_on: tuple[int, ...] = DEFAULT_RETRY_ON
    #: Deliveries in flight to one destination at once (a burst drains at the app's
    #: pace): a number the user set, or None for ``"auto"`` (concurrency.py).
    max_concurrency: int | None = None
    #: ``agent:LABEL`` (the agents connected with ``--label LABEL``), ``agent:*``
    #: (any agent of the tunnel) or an http(s) URL the server posts to itself.
    destinations: tuple[str, ...] = field(default=(ANY_AGENT,))

    @property
    def fan_out(self) -> bool:
        return self.destinations != (ANY_AGENT,)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["retry_on"] = list(self.retry_on)
        data["max_concurrency"] = AUTO if self.max_concurrency is None else self.max_concurrency
        data["destinations"] = list(self.destinations)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> TunnelSettings:
        return cls().updated(data or {})

    def updated(self, changes: dict[str, Any]) -> TunnelSettings:
        """A copy with ``changes`` applied; raises ``ConfigError`` naming the bad field."""
        unknown = set(changes) - {"mode", "retry_on", "max_concurrency", "destinations"}
        if unknown:
            raise ConfigError(f"unknown setting {sorted(unknown)[0]!r}")
        mode = changes.get("mode", self.mode)
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}")
        retry_on = changes.get("retry_on", self.retry_on)
        if not isinstance(retry_on, list | tuple) or not all(
            _is_int(s) and 100 <= s <= 599 for s in retry_on
        ):
            raise ConfigError("retry_on must be a list of HTTP statuses")
        concurrency = self.max_concurrency
        if "max_concurrency" in changes:
            given = changes["max_concurrency"]
            if given == AUTO:
                concurrency = None
            elif _is_int(given) and 1 <= given <= MAX_CONCURRENCY_LIMIT:
                concurrency = given
            else:
                limit = MAX_CONCURRENCY_LIMIT
                raise ConfigError(f'max_concurrency must be "{AUTO}" or between 1 and {limit}')
        destinations = changes.get("destinations", self.destinations)
        if not isinstance(destinations, list | tuple) or not 1 <= len(destinations) <= MAX_DESTINATIONS:
            raise ConfigError(f"destinations must be a list of 1 to {MAX_DESTINATIONS} entries")
        for destination in destinations:
            check_destination(destination)
        return TunnelSettings(
            mode, tuple(sorted(set(retry_on))), concurrency, tuple(dict.fromkeys(destinations))
        )


def check_destination(destination: Any) -> None:
    """Raise ``ConfigError`` unless ``destination`` is ``agent:LABEL`` or an http(s) URL."""
    if not isinstance(destination, str):
        raise ConfigError("a destination must be a string")
    if destination.startswith("agent:"):
        label = destination[len("agent:") :]
        if label != "*" and not is_valid_label(label):
            raise ConfigError(f"invalid agent label {label!r}: letters, digits, '.', '_' and '-'")
        return
    parts = urlsplit(destination)
    if (
        not destination.isprintable()  # control characters, which urlsplit would drop silently
        or " " in destination
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.username is not None
        or "?" in destination
        or "#" in destination  # the event's path would go into the fragment, never sent
    ):
        raise ConfigError(
            f"destination {destination!r} must be agent:LABEL or an http(s) URL without"
            " user, query, fragment, space or control character"
        )


def is_valid_label(label: str) -> bool:
    return 0 < len(label) <= 64 and all(c.isalnum() or c in "._-" for c in label)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not a number
