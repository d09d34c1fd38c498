"""Log output of ``relay-server serve``: text lines or one JSON object per line (``--log-format``)."""

from __future__ import annotations

import json
import logging
import time

from relay_web.malformed import count_malformed_requests

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (RFC 3339, UTC, milliseconds), ``level``,
    ``logger``, ``message``, the record's structured ``fields`` (the access log's) at the
    top level, and ``exception`` with the traceback text when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line: dict[str, object] = {
            "time": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):  # the fields are the record; the message is their summary
            line["message"] = getattr(record, "summary", line["message"])
            line.update(fields)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure_logging(level: str, fmt: str) -> None:
    """Send records at ``level`` (debug, info, warning, error) and above to stderr, as
    ``fmt`` (``text`` or ``json``); aiohttp's records of malformed requests are counted,
    never written (``relay_web.malformed``)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    count_malformed_requests()
