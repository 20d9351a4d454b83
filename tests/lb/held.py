"""A TCP connection through a virtual service, kept open (tests/lb/weights_suite.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from lb.table import Real

TIMEOUT = 2.0


@dataclass
class HeldConnection:
    real: Real
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def echo(self) -> bool:
        """Whether a line still goes to the real and comes back."""
        try:
            self.writer.write(b"still there?\n")
            await self.writer.drain()
            line = await asyncio.wait_for(self.reader.readline(), TIMEOUT)
        except (OSError, TimeoutError):
            return False
        return line == b"still there?\n"

    def close(self) -> None:
        self.writer.close()
