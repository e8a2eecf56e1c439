"""Log set-up for the projector and the scripts: the usual text lines, or one JSON object a line.

``LOG_FORMAT=json`` is for log shippers: every line parses alone, and the per-batch figures are
fields of their own (passed as ``extra={"fields": {...}}``), so nobody has to parse a sentence.
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="microseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                # The fixed keys win: a field never passes itself off as the level or message.
                line.setdefault(key, value)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        # default=str: a stray datetime or Decimal in a field must not cost the log line.
        return orjson.dumps(line, default=str).decode()


def setup(fmt: str | None = None, default_level: str = "INFO") -> None:
    """Configure the root logger: ``fmt`` defaults to LOG_FORMAT, the level to LOG_LEVEL."""
    fmt = (fmt or os.environ.get("LOG_FORMAT") or "text").lower()
    if fmt not in FORMATS:
        raise ValueError(f"LOG_FORMAT must be one of {', '.join(FORMATS)}, not {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", default_level), handlers=[handler], force=True
    )
