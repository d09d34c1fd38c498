"""What ``relay-agent connect`` shows on stdout while it runs.

Off a terminal (a pipe, CI, a log file) ``PlainConsole`` prints lines that scripts and
tests read, exactly as they always were: the ``Forwarding URL -> TARGET`` lines once the
server accepted the agent (again only if they change), ``Inspect    URL`` under them the
first time, then one line per request: ``HH:MM:SS METHOD PATH STATUS NNms [reason]``,
written together every ``PLAIN_FLUSH`` seconds (one write for a burst, not one each).

On a terminal ``LiveConsole`` draws a status block like ngrok's: online, or reconnecting
with the reason and the next try; the URLs; the inspector's URL; counters and the p50 and
p90 latency of the last requests; the events waiting on the server (asked every
``WAITING_POLL`` seconds); and under it the last request lines, scrolling. It is redrawn
at most ``REDRAWS_PER_SECOND`` times a second, and only when something changed (or a
countdown runs). Log lines (warnings) join the request lines instead of breaking the
drawing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections import deque
from typing import Any, Protocol, TextIO

import click

from relay_protocol import RelayError, RequestHead, Welcome

from . import api_client
from .background import Background
from .config import AgentConfig

log = logging.getLogger("relay.agent")

#: Redraws of the status block per second at most: a burst of requests costs a few
#: redraws, not one each.
REDRAWS_PER_SECOND = 4
#: Requests the latency percentiles are taken over: recent enough to follow a change.
LATENCY_WINDOW = 1000
#: Request lines kept for the scrolling part (what fits a tall terminal).
MAX_LINES = 200
#: Seconds between two questions to the server about the events waiting for this
#: agent's tunnels: one small API call, while the console is on a terminal only.
WAITING_POLL = 5.0
#: Seconds the plain console keeps request lines before writing them out together: a
#: write and a flush per request cost the agent ~5 % of its CPU under load (issue 10).
PLAIN_FLUSH = 0.1


def request_line(head: RequestHead, status: int | str, seconds: float, error: str) -> str:
    """``HH:MM:SS METHOD PATH STATUS NNms [reason]``: one finished request."""
    path = head.target.decode("utf-8", "replace")
    why = f" {error}" if error else ""
    return f"{time.strftime('%H:%M:%S')} {head.method:7} {path} {status} {seconds * 1000:.0f}ms{why}"


def forwarding_lines(welcome: Welcome, target: str) -> list[str]:
    return [f"Forwarding {url} -> {target}" for tunnel in welcome.tunnels for url in tunnel.get("urls", [])]


class Console(Protocol):
    """What the tunnel tells the console; ``start`` and ``stop`` bracket the run."""

    def start(self) -> None: ...
    async def stop(self) -> None: ...
    def welcome(self, welcome: Welcome) -> None: ...
    def request(self, head: RequestHead, status: int | str, seconds: float, error: str) -> None: ...
    def offline(self, why: str, delay: float) -> None: ...


def console_for(stream: TextIO, config: AgentConfig, inspect_url: str | None) -> Console:
    """A ``LiveConsole`` when ``stream`` is a terminal, else a ``PlainConsole``."""
    if stream.isatty():
        return LiveConsole(config, inspect_url, stream)
    return PlainConsole(config, inspect_url)


class PlainConsole:
    """Plain lines for pipes and CI (the module's doc gives them)."""

    def __init__(self, config: AgentConfig, inspect_url: str | None) -> None:
        self.target = config.target.base_url
        self.inspect_url = inspect_url
        self.printed: list[str] = []
        self._lines: list[str] = []
        self._flush: asyncio.TimerHandle | None = None

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        self.flush()

    def welcome(self, welcome: Welcome) -> None:
        self.flush()
        lines = forwarding_lines(welcome, self.target)
        if lines == self.printed:
            log.warning("reconnected")
            return
        first = not self.printed
        self.printed = lines
        for line in lines:
            click.echo(line)
        if first and self.inspect_url is not None:
            click.echo(f"Inspect    {self.inspect_url}")

    def request(self, head: RequestHead, status: int | str, seconds: float, error: str) -> None:
        self._lines.append(request_line(head, status, seconds, error))
        if self._flush is not None:
            return
        try:
            self._flush = asyncio.get_running_loop().call_later(PLAIN_FLUSH, self.flush)
        except RuntimeError:  # no event loop: nothing would write them later
            self.flush()

    def flush(self) -> None:
        """Write the request lines kept so far."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if self._lines:
            lines, self._lines = self._lines, []
            click.echo("\n".join(lines))

    def offline(self, why: str, delay: float) -> None:
        self.flush()  # the reason is on stderr already


class _ToConsole(logging.Handler):
    """Log records as lines of the live console's scrolling part."""

    def __init__(self, console: LiveConsole) -> None:
        super().__init__()
        self.console = console
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.console.note(self.format(record), "yellow" if record.levelno < logging.ERROR else "red")


class LiveConsole:
    """The status block and scrolling request lines of a terminal (the module's doc)."""

    def __init__(self, config: AgentConfig, inspect_url: str | None, stream: TextIO) -> None:
        # Imported here: rich is needed on a terminal only, and takes a while to import.
        from rich.console import Console as RichConsole
        from rich.live import Live

        self.config = config
        self.inspect_url = inspect_url
        self.rich = RichConsole(file=stream, highlight=False)
        self.live = Live(
            console=self.rich,
            auto_refresh=False,
            redirect_stdout=False,
            redirect_stderr=False,
            transient=False,
        )
        self.background = Background()
        self.names: list[str] = list(config.names)
        self.urls: list[str] = []
        self.state = "connecting"  # connecting, online, reconnecting
        self.why = ""
        self.retry_at = 0.0
        self.total = 0
        self.failed = 0
        self.latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.waiting: int | None = None
        self.lines: deque[tuple[str, str]] = deque(maxlen=MAX_LINES)
        self._dirty = asyncio.Event()
        self._poll_now = asyncio.Event()
        self._log_handler = _ToConsole(self)
        self._stderr_handlers: list[logging.Handler] = []

    def start(self) -> None:
        root = logging.getLogger()
        if sys.stderr.isatty():  # logs would break the drawing: they become lines of it
            self._stderr_handlers = [h for h in root.handlers if isinstance(h, logging.StreamHandler)]
            for handler in self._stderr_handlers:
                root.removeHandler(handler)
            root.addHandler(self._log_handler)
        self.live.start()
        self._dirty.set()
        self.background.spawn(self._redraw(), "console redraw")
        self.background.spawn(self._poll_waiting(), "console events waiting")

    async def stop(self) -> None:
        await self.background.stop()
        self.live.update(self.render(), refresh=True)
        self.live.stop()
        root = logging.getLogger()
        root.removeHandler(self._log_handler)
        for handler in self._stderr_handlers:
            root.addHandler(handler)

    # -- what the tunnel tells ------------------------------------------------------------

    def welcome(self, welcome: Welcome) -> None:
        self.names = [str(t["name"]) for t in welcome.tunnels if "name" in t] or self.names
        self.urls = forwarding_lines(welcome, self.config.target.base_url)
        self.state = "online"
        self._dirty.set()
        self._poll_now.set()

    def request(self, head: RequestHead, status: int | str, seconds: float, error: str) -> None:
        self.total += 1
        if not isinstance(status, int) or status >= 500:
            self.failed += 1
        self.latencies.append(seconds)
        style = (
            "green"
            if isinstance(status, int) and status < 400
            else "yellow"
            if isinstance(status, int) and status < 500
            else "red"
        )
        self.lines.append((request_line(head, status, seconds, error), style))
        self._dirty.set()

    def offline(self, why: str, delay: float) -> None:
        self.state = "reconnecting"
        self.why = why
        self.retry_at = time.monotonic() + delay
        self._dirty.set()

    def note(self, text: str, style: str) -> None:
        self.lines.append((text, style))
        self._dirty.set()

    # -- drawing ---------------------------------------------------------------------------

    def percentile(self, fraction: float) -> float | None:
        """The latency (seconds) below which ``fraction`` of the window's requests took."""
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]

    def render(self) -> Any:
        from rich.console import Group
        from rich.rule import Rule
        from rich.table import Table
        from rich.text import Text

        grid = Table.grid(padding=(0, 3))
        grid.add_column(style="bold", no_wrap=True)
        grid.add_column()
        if self.state == "online":
            grid.add_row("Session Status", Text("online", style="bold green"))
        elif self.state == "reconnecting":
            left = max(0.0, self.retry_at - time.monotonic())
            grid.add_row(
                "Session Status",
                Text(f"reconnecting ({self.why}); next try in {left:.0f}s", style="bold yellow"),
            )
        else:
            grid.add_row("Session Status", Text(f"connecting to {self.config.server}", style="yellow"))
        for line in self.urls:
            grid.add_row("Forwarding", line.removeprefix("Forwarding "))
        if self.inspect_url is not None:
            grid.add_row("Inspect", self.inspect_url)
        grid.add_row("Requests", f"{self.total} total, {self.failed} failed")
        p50, p90 = self.percentile(0.5), self.percentile(0.9)
        grid.add_row(
            "Latency",
            "-" if p50 is None or p90 is None else f"p50 {p50 * 1000:.0f}ms, p90 {p90 * 1000:.0f}ms",
        )
        grid.add_row("Events waiting", "unknown" if self.waiting is None else f"{self.waiting} on the server")
        header_rows = 4 + len(self.urls) + (self.inspect_url is not None) + 4
        room = max(1, self.rich.size.height - header_rows)
        shown = list(self.lines)[-room:]
        return Group(
            Text("relay-agent", style="bold"),
            grid,
            Rule("HTTP Requests", align="left"),
            *(Text(text, style=style, no_wrap=True, overflow="ellipsis") for text, style in shown),
        )

    async def _redraw(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            self.live.update(self.render(), refresh=True)
            if self.state == "reconnecting":
                self._dirty.set()  # the countdown runs
            await asyncio.sleep(1 / REDRAWS_PER_SECOND)

    async def _poll_waiting(self) -> None:
        config = self.config
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(WAITING_POLL):
                    await self._poll_now.wait()  # set when the agent is (again) online
            self._poll_now.clear()
            if self.state == "online":
                try:
                    answer = await asyncio.to_thread(
                        api_client.call, config.server, config.token, "GET", "tunnels", None, config.tls
                    )
                    counts = [t.get("waiting") for t in answer["tunnels"] if t["name"] in self.names]
                    waiting = sum(counts) if counts and all(isinstance(c, int) for c in counts) else None
                except (RelayError, KeyError, TypeError):
                    waiting = None
                if waiting != self.waiting:
                    self.waiting = waiting
                    self._dirty.set()
