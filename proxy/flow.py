"""Flow control shared by both forwarders.

When a peer's write buffer passes its high-water mark, asyncio calls the peer
protocol's ``pause_writing``; we answer by pausing reading on this side, so a slow
reader never makes sidelink buffer without bound. Both calls are idempotent, and
safe on a transport that is already closing.
"""

from __future__ import annotations

import asyncio
from typing import Final

# Per-transport write buffer limits: large enough to keep bulk transfers streaming,
# small enough that 1,000 stalled connections stay cheap.
WRITE_HIGH_WATER: Final = 256 * 1024
WRITE_LOW_WATER: Final = 64 * 1024


class FlowControl:
    __slots__ = ("_transport", "read_paused")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self.read_paused = False
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)

    def pause_reading(self) -> None:
        if not self.read_paused and not self._transport.is_closing():
            self.read_paused = True
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused and not self._transport.is_closing():
            self.read_paused = False
            self._transport.resume_reading()
