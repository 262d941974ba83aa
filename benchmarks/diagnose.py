"""What sidelink says about the run itself: warnings in its log, and its own error metrics.

wrk only sees what reaches the client; these show what sidelink noticed on the way
(upstream resets, retries, ejections, proxy-made 5xx answers, gRPC status codes).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from benchmarks.procs import http_get

LOG_PROBLEM = re.compile(r"\b(WARNING|ERROR|CRITICAL|Traceback)\b|\"level\": ?\"(warning|error)")
LOG_EXAMPLES = 8
# Counters whose non-zero values deserve a look after a benchmark.
WATCHED_METRICS = (
    "sidelink_requests_total",
    "sidelink_upstream_errors_total",
    "sidelink_retries_total",
    "sidelink_endpoint_ejections_total",
    "sidelink_connections_opened_total",
    "sidelink_connections_shed_total",
    "sidelink_grpc_responses_total",
)
SAMPLE_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def log_summary(path: Path) -> dict[str, Any]:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return {"problem_lines": None, "error": str(e), "examples": []}
    problems = [line for line in lines if LOG_PROBLEM.search(line)]
    examples: list[str] = []
    for line in problems:
        if line not in examples and len(examples) < LOG_EXAMPLES:
            examples.append(line[:300])
    return {"lines": len(lines), "problem_lines": len(problems), "examples": examples}


def metrics(admin_port: int) -> dict[str, float]:
    """The watched counters, one entry per label set: ``name{labels}`` -> value."""
    answer = http_get(admin_port, "/metrics", timeout=5.0)
    if answer is None or answer[0] != 200:
        return {}
    found: dict[str, float] = {}
    for line in answer[1].decode(errors="replace").splitlines():
        match = SAMPLE_LINE.match(line)
        if match is None or match.group(1) not in WATCHED_METRICS:
            continue
        value = float(match.group(3))
        if value:
            found[match.group(1) + (match.group(2) or "")] = value
    return found
