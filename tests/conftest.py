"""Fixtures shared by the suite: the in-process DNS server and the event loop choice."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import uvloop

from proxy import build
from proxy.dnsserver import DnsServer

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


# tests/image builds and runs the container image (root, dockerd, minutes): not part of the
# default run; `python -m pytest tests/image` runs it (.ci/run does).
collect_ignore = ["image"]


def pytest_report_header() -> str:
    return f"sidelink hot path: {build()}"


ROOT = Path(__file__).parent.parent
# What each compiled module was built from: {source: {"sha256": ..., "built": .so mtime_ns}}.
BUILD_RECORD = ROOT / "build" / "sidelink-sources.json"


def pytest_sessionstart(session: pytest.Session) -> None:
    """Compiled modules built from other source than the .py beside them test other code."""
    stale = stale_sources(ROOT / "proxy", BUILD_RECORD)
    if stale:
        raise pytest.UsageError(
            f"compiled modules built from other source than {', '.join(stale)}: run "
            "`.venv/bin/pip install -e .` again (SIDELINK_COMPILE=0 for pure Python)"
        )


def stale_sources(package: Path, record_path: Path) -> list[str]:
    """The sources (relative to ``package``) whose compiled module was built from other text.

    A file's time says nothing about its text: a `git checkout` of an unchanged file makes
    it newer than its build. So the record keeps the hash of the source each build was
    made from, keyed by the build's own mtime; a rebuild has a new mtime and no entry yet.
    Until the build writes the record itself (setup.py does not yet), the first session
    that sees a build newer than its source takes that source's hash as the build's.
    """
    try:
        record: dict[str, dict[str, object]] = json.loads(record_path.read_text())
    except (OSError, ValueError):
        record = {}
    stale, changed = [], False
    for built in sorted(package.rglob("*.so")):
        source = built.parent / f"{built.name.split('.')[0]}.py"
        if not source.exists():
            continue
        name = str(source.relative_to(package))
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
        built_at = built.stat().st_mtime_ns
        entry = record.get(name)
        if entry is not None and entry.get("built") == built_at:
            if entry.get("sha256") != digest:
                stale.append(name)
        elif built_at >= source.stat().st_mtime_ns:
            record[name] = {"sha256": digest, "built": built_at}
            changed = True
        else:
            stale.append(name)  # no hash for this build, and the source changed after it
    if changed:
        with contextlib.suppress(OSError):
            record_path.parent.mkdir(parents=True, exist_ok=True)
            temporary = record_path.with_suffix(".tmp")
            temporary.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
            temporary.replace(record_path)
    return stale


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Tests marked `both_loops` run once on asyncio's default loop and once on uvloop."""
    if item.get_closest_marker("both_loops"):
        return LOOPS
    return {"asyncio": LOOPS["asyncio"]}


@pytest.fixture
async def dns() -> AsyncIterator[DnsServer]:
    async with DnsServer() as server:
        yield server


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """Anything sidelink lets escape to the loop's exception handler fails the test."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    yield errors
    loop.set_exception_handler(previous)
    assert not errors, errors
