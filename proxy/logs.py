"""Log set-up: human text or one JSON object per line, for the collectors of a cluster.

Access lines (``sidelink.access``, one per http request or tcp connection) carry
their fields: as ``key=value`` text, or with ``format: json`` as the keys of the
line's own object (SPEC.md, ``logging.access_log``).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

access_log = logging.getLogger("sidelink.access")
# The shorter names of the text form.
TEXT_KEYS = {"bytes_received": "bytes_in", "bytes_sent": "bytes_out", "endpoint": "upstream"}

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_access(peer: str, fields: dict[str, Any]) -> None:
    """One access line: ``fields`` in SPEC.md's order (route and protocol first)."""
    parts = [f"{fields['protocol']} route={fields['route']} peer={peer}"]
    for key, value in fields.items():
        if key in ("route", "protocol") or value is None:
            continue
        if key == "duration_seconds":
            parts.append(f"duration_ms={value * 1000:.3f}")
        elif key in ("method", "path"):
            parts.append(str(value))
        else:
            parts.append(f"{TEXT_KEYS.get(key, key)}={value}")
    access_log.info(" ".join(parts), extra={"access": fields})


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = (
            time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z"
        )
        fields = getattr(record, "access", None)
        if fields is not None:
            return json.dumps({"time": stamp, **fields})
        entry = {
            "time": stamp,
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str, fmt: str) -> None:
    """(Re)configure logging; safe to call again on reload."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    # The root logger, so asyncio's and aiohttp's messages share the format; sidelink's
    # own level applies to sidelink, other libraries speak at warning and above.
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("sidelink").setLevel(level.upper())
