"""The asyncio shell of the gossip core: UDP packets and TCP streams on one address.

It moves bytes and nothing else. Every input (a datagram, a stream, the timer)
is unwrapped (label, encryption), decoded, fed to the `Membership` core with
the loop's monotonic time, and then `_drive` sends what the core wants sent,
opens the streams it asks for, hands its events on, and re-arms the single
timer at the core's next deadline.

A packet that fails to unwrap or decode is dropped and counted by reason
(`drops`); nothing raised by hostile input reaches the loop. TCP streams are
framed as a 4-byte big-endian length and the (sealed) payload, bounded in
size and in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections import Counter
from collections.abc import Callable
from typing import Any

from gossip import codec, security
from gossip.errors import DecodeError
from gossip.membership import Membership
from gossip.messages import Ack, Addr, Packet, Ping, PushPull, StreamRequest

log = logging.getLogger(__name__)

MAX_STREAM = 20 << 20  # memberlist's bound on a push-pull
#: No sender of ours makes a datagram near this: the core fills 1,400 bytes.
MAX_PACKET = 16 << 10
RECEIVE_BUFFER = 4 << 20  # room for a burst while the loop is busy
MAX_INBOUND_STREAMS = 128  # memberlist: at most 128 push-pulls in flight
_LENGTH = struct.Struct("!I")

EventSink = Callable[[Any], None]


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, shell: GossipShell) -> None:
        self.shell = shell

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.shell.receive_packet(data, (str(addr[0]), int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        self.shell.drops["send_error"] += 1


class GossipShell:
    def __init__(self, core: Membership, host: str, port: int, *,
                 keyring: security.Keyring | None = None, label: bytes = b"",
                 on_event: EventSink | None = None, tcp_timeout: float = 10.0) -> None:
        self.core = core
        self.host, self.port = host, port
        self.keyring = keyring
        self.label = label
        self.on_event = on_event or (lambda _event: None)
        self.tcp_timeout = tcp_timeout
        self.drops: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._inbound = 0
        self._closing = False

    def __repr__(self) -> str:
        return f"<GossipShell {self.host}:{self.port} drops={sum(self.drops.values())}>"

    def now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        transport, _ = await self._loop.create_datagram_endpoint(
            lambda: _Datagrams(self), local_addr=(self.host, self.port), reuse_port=False)
        self._udp = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        try:
            self._tcp = await asyncio.start_server(self._serve_stream, self.host, self.port,
                                                   reuse_address=True)
        except OSError:
            self._udp.close()
            raise
        self._drive()

    async def stop(self) -> None:
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._tcp is not None:
            self._tcp.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._tcp.wait_closed(), 2)
        if self._udp is not None:
            self._udp.close()

    def flush(self) -> None:
        """Send what the core has queued now (after a call made on it from outside)."""
        self._drive()

    # -- inputs ------------------------------------------------------------------

    def receive_packet(self, data: bytes, source: Addr) -> None:
        self.counts["packets_in"] += 1
        if len(data) > MAX_PACKET:
            self.drops["oversized"] += 1
            return
        try:
            plain = security.unwrap(data, self.keyring, self.label)
            messages = codec.decode_packet(plain)
        except DecodeError as exc:
            self.drops[exc.reason] += 1
            return
        except Exception as exc:  # a bug in a decoder must cost one packet only
            self.drops["internal_error"] += 1
            log.exception("gossip packet from %s: %r", source, exc)
            return
        self.core.handle_packet(messages, source, self.now())
        self._drive()

    async def _serve_stream(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("", 0)
        if self._inbound >= MAX_INBOUND_STREAMS:
            self.drops["too_many_streams"] += 1
            writer.close()
            return
        self._inbound += 1
        try:
            message = await asyncio.wait_for(self._read_stream(reader), self.tcp_timeout)
            if not isinstance(message, PushPull | Ping):
                if message is not None:
                    self.drops["unexpected_stream"] += 1
                return
            reply = self.core.handle_stream(message, (str(peer[0]), int(peer[1])), self.now())
            if reply is None:  # a TCP ping meant for another node
                return
            writer.write(self._frame(codec.encode_stream(reply)))
            await asyncio.wait_for(writer.drain(), self.tcp_timeout)
            self._drive()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            self.drops["stream_failed"] += 1
        finally:
            self._inbound -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _read_stream(self, reader: asyncio.StreamReader) -> PushPull | Ping | Ack | None:
        (size,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
        if size > MAX_STREAM:
            self.drops["oversized"] += 1
            return None
        data = await reader.readexactly(size)
        try:
            message = codec.decode_stream(security.unwrap(data, self.keyring, self.label))
        except DecodeError as exc:
            self.drops[exc.reason] += 1
            return None
        if not isinstance(message, PushPull | Ping | Ack):
            self.drops["unexpected_stream"] += 1
            return None
        return message

    def _frame(self, payload: bytes) -> bytes:
        sealed = security.wrap(payload, self.keyring, self.label)
        return _LENGTH.pack(len(sealed)) + sealed

    # -- outputs -----------------------------------------------------------------

    def _drive(self) -> None:
        if self._closing:
            return
        for packet in self.core.packets_to_send():
            self._send(packet)
        for request in self.core.streams_to_open():
            task = asyncio.create_task(self._open_stream(request))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        while (event := self.core.next_event()) is not None:
            try:
                self.on_event(event)
            except Exception:
                log.exception("gossip event handler failed on %r", event)
        self._arm_timer()

    def _send(self, packet: Packet) -> None:
        if self._udp is None or not packet.messages:
            return
        try:
            data = security.wrap(codec.encode_packet(list(packet.messages)), self.keyring,
                                 self.label)
            self._udp.sendto(data, packet.to)
            self.counts["packets_out"] += 1
        except (OSError, ValueError) as exc:
            self.drops["send_error"] += 1
            log.debug("gossip send to %s failed: %r", packet.to, exc)

    async def _open_stream(self, request: StreamRequest) -> None:
        reply: PushPull | Ping | Ack | None = None
        writer: asyncio.StreamWriter | None = None
        try:
            reader, stream = await asyncio.wait_for(
                asyncio.open_connection(*request.to), self.tcp_timeout)
            writer = stream
            stream.write(self._frame(codec.encode_stream(request.message)))
            await asyncio.wait_for(stream.drain(), self.tcp_timeout)
            reply = await asyncio.wait_for(self._read_stream(reader), self.tcp_timeout)
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            self.drops["stream_failed"] += 1
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
        if not self._closing:
            answer = reply if isinstance(reply, PushPull | Ack) else None
            self.core.handle_stream_reply(answer, request.to, self.now())
            self._drive()

    def _arm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.core.next_timer()
        if deadline is not None and self._loop is not None:
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.core.handle_timer(self.now())
        self._drive()
