"""Waiting for a condition with a deadline: the tests never sleep to wait."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def until(condition: Callable[[], object], timeout: float = 5.0, what: str = "") -> None:
    """Wait for condition() to be true, polling; fail with `what` after the deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        await asyncio.sleep(0.01)


def until_sync(condition: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
    """until() for code without a loop (the subprocess tests)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(0.02)


async def settled(value: Callable[[], int], quiet: float = 0.3, timeout: float = 10.0) -> int:
    """Wait until value() has not changed for `quiet` seconds; return it."""
    last = value()
    since = time.monotonic()

    def still() -> bool:
        nonlocal last, since
        now = value()
        if now != last:
            last, since = now, time.monotonic()
            return False
        return time.monotonic() - since >= quiet

    await until(still, timeout, "the transfer to stall")
    return last
