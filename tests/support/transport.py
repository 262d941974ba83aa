"""A fake asyncio transport: protocol objects are driven by feeding bytes, without sockets.

It records what the protocol writes and how it drives the transport (reading paused,
EOF written, closed or aborted), the way uvicorn's tests use a MockTransport.
"""

from __future__ import annotations

import asyncio
from typing import Any


class FakeTransport(asyncio.Transport):
    """Records writes and flow-control calls; `lose()` plays the connection going away.

    With `keep=False` only the writes are counted (the benchmarks write millions of
    responses and want none of them kept). Given a `protocol`, close() and abort() call
    its connection_lost, once, at once (asyncio would on its next loop iteration); without
    one, the test calls lose() when it wants the protocol told.
    """

    def __init__(
        self,
        protocol: asyncio.BaseProtocol | None = None,
        *,
        peername: tuple[str, int] = ("127.0.0.1", 40000),
        sockname: tuple[str, int] = ("127.0.0.1", 8080),
        keep: bool = True,
        can_write_eof: bool = True,
    ) -> None:
        super().__init__()
        self.protocol = protocol
        self.extra: dict[str, Any] = {"peername": peername, "sockname": sockname}
        self.keep = keep
        self.data = bytearray()
        self.writes: list[bytes] = []
        self.write_count = 0
        self.late_writes = 0
        self.reading_paused = False
        self.eof_written = False
        self.closed = False
        self.aborted = False
        self.high_water: int | None = None
        self.low_water: int | None = None
        self.buffer_size = 0  # what get_write_buffer_size() answers; set it to play a full buffer
        self._can_write_eof = can_write_eof
        self._lost = False

    # --- what the protocol calls ---------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.eof_written:
            raise RuntimeError("Cannot call write() after write_eof()")  # as asyncio's do
        if self.closed:
            self.late_writes += 1  # asyncio drops these (with a warning, in time)
            return
        self.write_count += 1
        if self.keep:
            chunk = bytes(data)
            self.data += chunk
            self.writes.append(chunk)

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def write_eof(self) -> None:
        if not self._can_write_eof:
            raise NotImplementedError("this transport cannot write EOF")
        self.eof_written = True

    def can_write_eof(self) -> bool:
        return self._can_write_eof

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.lose(None)

    def abort(self) -> None:
        self.aborted = True
        if not self.closed:
            self.closed = True
            self.lose(None)

    def pause_reading(self) -> None:
        self.reading_paused = True

    def resume_reading(self) -> None:
        self.reading_paused = False

    def is_reading(self) -> bool:
        return not self.reading_paused and not self.closed

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high_water, self.low_water = high, low

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (self.low_water or 0, self.high_water or 0)

    def get_write_buffer_size(self) -> int:
        return self.buffer_size

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.extra.get(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self.protocol is not None
        return self.protocol

    # --- what the test calls -------------------------------------------------------------

    def lose(self, exc: Exception | None = None) -> None:
        """The connection is gone (by close, abort, or the peer): connection_lost, once."""
        self.closed = True
        if self.protocol is not None and not self._lost:
            self._lost = True
            self.protocol.connection_lost(exc)

    def take(self) -> bytes:
        """What was written since the last take()."""
        out = bytes(self.data)
        self.data.clear()
        self.writes.clear()
        return out
