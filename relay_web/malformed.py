"""What an aiohttp server of relay's logs of the malformed requests its HTTP parser
refuses: the relay server's public port and the agent's inspector both face strangers."""

from __future__ import annotations

import logging
import time
from collections import Counter

#: Seconds between two lines about malformed requests: a stranger sending garbage in a
#: loop gets one line per interval, with a count, never a line (and a traceback) each.
MALFORMED_LOG_INTERVAL = 30.0


class MalformedRequestLog(logging.Filter):
    """A filter for aiohttp's server logger. Its HTTP parser answers a malformed request
    400 and logs it at error level with a traceback whose message quotes the offending
    bytes: a token in a query string, an ``Authorization`` or ``Cookie`` value. Such a
    record never passes; instead one info line per ``MALFORMED_LOG_INTERVAL`` counts them
    by kind (the parser's exception class), with no byte of any request."""

    def __init__(self) -> None:
        super().__init__()
        from aiohttp.http_exceptions import HttpProcessingError  # only a server needs it

        self._parser_error = HttpProcessingError
        self._kinds: Counter[str] = Counter()
        self._last: float | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, self._parser_error):
            return True
        self._kinds[type(error).__name__] += 1
        now = time.monotonic()
        if self._last is not None and now - self._last < MALFORMED_LOG_INTERVAL:
            return False
        record.msg = "refused %d malformed requests (400 from the HTTP parser) since the last such line: %s"
        record.args = (self._kinds.total(), ", ".join(f"{k} x{n}" for k, n in self._kinds.most_common()))
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.INFO, "INFO"
        self._kinds.clear()
        self._last = now
        return True


def count_malformed_requests() -> None:
    """Put a (single) ``MalformedRequestLog`` on aiohttp's server logger."""
    server_log = logging.getLogger("aiohttp.server")
    for old in [f for f in server_log.filters if isinstance(f, MalformedRequestLog)]:
        server_log.removeFilter(old)
    server_log.addFilter(MalformedRequestLog())
