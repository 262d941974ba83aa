"""Fixtures shared by the suite: the in-process DNS server and the event loop choice."""

from __future__ import annotations

import asyncio
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


def pytest_report_header() -> str:
    return f"sidelink hot path: {build()}"


def pytest_sessionstart(session: pytest.Session) -> None:
    """Compiled modules older than their source would test yesterday's code."""
    package = Path(__file__).parent.parent / "proxy"
    stale = sorted(
        str(source.relative_to(package))
        for built in package.rglob("*.so")
        if (source := built.parent / f"{built.name.split('.')[0]}.py").exists()
        and built.stat().st_mtime < source.stat().st_mtime
    )
    if stale:
        raise pytest.UsageError(
            f"compiled modules older than {', '.join(stale)}: run "
            "`.venv/bin/pip install -e .` again (SIDELINK_COMPILE=0 for pure Python)"
        )


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
