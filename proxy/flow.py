"""Flow control shared by every forwarder: reading pauses for named reasons.

A connection stops reading while any reason holds and resumes when none is left:
its peer's write buffer is full (``PEER``: asyncio called the peer protocol's
``pause_writing``), too many requests are pipelined (``PIPELINE``), too much is
held for a peer that is not attached yet (``BUFFER``), the upstream is still being
connected (``CONNECTING``), or a refused request is being answered (``REFUSED``).
So a slow reader never makes sidelink buffer without bound. Pausing or resuming a
reason twice is harmless, and so is either call on a transport that is closing.

Two connections that forward to each other are ``link``-ed: each one's full write
buffer pauses the other's reading, and a link made while one side is full starts
paused. Protocols inherit :class:`Forwarding` for the asyncio half of that.

On every read's path and compiled with mypyc (setup.py).
"""

from __future__ import annotations

import asyncio
from typing import Final

from mypy_extensions import mypyc_attr

# Per-transport write buffer limits: large enough to keep bulk transfers streaming,
# small enough that 1,000 stalled connections stay cheap.
WRITE_HIGH_WATER: Final = 256 * 1024
WRITE_LOW_WATER: Final = 64 * 1024

# Why reading is paused: bits of FlowControl.reasons.
PEER: Final = 1
PIPELINE: Final = 2
BUFFER: Final = 4
CONNECTING: Final = 8
REFUSED: Final = 16
REASON_NAMES: Final = {
    PEER: "peer",
    PIPELINE: "pipeline",
    BUFFER: "buffer",
    CONNECTING: "connecting",
    REFUSED: "refused",
}


class FlowControl:
    __slots__ = ("_transport", "peer", "reasons", "write_paused")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self.reasons = 0  # why reading is paused (0: it is not)
        self.write_paused = False  # our transport's write buffer is over its high water
        self.peer: FlowControl | None = None
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)

    def __repr__(self) -> str:
        names = [name for bit, name in REASON_NAMES.items() if self.reasons & bit]
        return f"<FlowControl paused={','.join(names) or '-'} write_paused={self.write_paused}>"

    @property
    def read_paused(self) -> bool:
        return self.reasons != 0

    def pause(self, reason: int) -> None:
        if not self.reasons and not self._transport.is_closing():
            self._transport.pause_reading()
        self.reasons |= reason

    def resume(self, reason: int) -> None:
        reasons = self.reasons
        if reasons & reason:
            self.reasons = reasons & ~reason
            if not self.reasons and not self._transport.is_closing():
                self._transport.resume_reading()

    def repause(self) -> None:
        """Say pause to the transport again: uvloop may deliver one read that was under
        way when it was first told."""
        if self.reasons and not self._transport.is_closing():
            self._transport.pause_reading()

    # --- the peer -------------------------------------------------------------------

    def link(self, peer: FlowControl) -> None:
        """Forward to and from ``peer``: each side's full write buffer pauses the other."""
        self.peer = peer
        peer.peer = self
        if self.write_paused:
            peer.pause(PEER)
        if peer.write_paused:
            self.pause(PEER)

    def unlink(self) -> None:
        """Stop forwarding to the peer; neither side stays paused on the other's account."""
        peer = self.peer
        if peer is not None:
            self.peer = peer.peer = None
            if peer.reasons:  # (checked here: this runs once per request)
                peer.resume(PEER)
            if self.reasons:
                self.resume(PEER)

    def writing_paused(self) -> None:
        self.write_paused = True
        if self.peer is not None:
            self.peer.pause(PEER)

    def writing_resumed(self) -> None:
        self.write_paused = False
        if self.peer is not None:
            self.peer.resume(PEER)


@mypyc_attr(allow_interpreted_subclasses=True)  # (for proxy.pool.Pooled's stand-ins in tests)
class Forwarding(asyncio.Protocol):
    """A protocol whose write buffer's state reaches its peer through ``flow``."""

    flow: FlowControl  # made in connection_made, with the transport

    def pause_writing(self) -> None:
        self.flow.writing_paused()

    def resume_writing(self) -> None:
        self.flow.writing_resumed()
