"""A raw two-way pipe between two transports, with flow control and half-close.

Used after an HTTP Upgrade (WebSocket and others: once the task answered 101
both sides are plain bytes) and for `sni://` passthrough. Each side's
protocol is swapped for a `PipeEnd` (`transport.set_protocol`); when one side
cannot take more (`pause_writing`) the other stops reading. An EOF is passed
on as a half-close where the transport can write one; the pipe closes once
both directions ended or either side is lost.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast


class PipeEnd(asyncio.Protocol):
    def __init__(self, transport: asyncio.Transport, on_close: Callable[[], None] | None) -> None:
        self.transport = transport
        self.peer: PipeEnd | None = None
        self.eof = False
        self._on_close = on_close

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio's, though they are ones in kind
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.peer is not None:
            self.peer.transport.write(data)

    def eof_received(self) -> bool | None:
        self.eof = True
        peer = self.peer
        if peer is None:
            return None
        if peer.eof or not peer.transport.can_write_eof():
            peer.transport.close()
            return None
        peer.transport.write_eof()
        return True  # keep writing the other direction

    def connection_lost(self, exc: Exception | None) -> None:
        peer, self.peer = self.peer, None
        if peer is not None:
            peer.peer = None
            if exc is None:
                peer.transport.close()
            else:
                peer.transport.abort()
        if self._on_close is not None:
            self._on_close()
            self._on_close = None

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.transport.resume_reading()


def splice(
    left: asyncio.Transport,
    right: asyncio.Transport,
    *,
    left_pending: bytes = b"",
    right_pending: bytes = b"",
    on_close: Callable[[], None] | None = None,
) -> None:
    """Join two transports; `*_pending` are bytes already read from that side, to pass on."""
    a = PipeEnd(left, on_close)
    b = PipeEnd(right, None)
    a.peer, b.peer = b, a
    left.set_protocol(a)
    right.set_protocol(b)
    if left_pending:
        right.write(left_pending)
    if right_pending:
        left.write(right_pending)
    # Either side may have been paused by the HTTP machinery before the switch.
    if left.is_reading() is False:
        left.resume_reading()
    if right.is_reading() is False:
        right.resume_reading()
