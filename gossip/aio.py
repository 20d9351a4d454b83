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

An inbound stream is a stranger's until its first frame opens (decrypts and
verifies with the keyring; in a plaintext cluster, decodes as a PushPull or
Ping). A stranger holds no member's slot (`gossip.admission`): it must send
its length prefix within AUTH_TIMEOUT and its frame soon after, or be cut;
its length is checked against `unauthenticated_limit()` before a byte of the
frame is buffered. That limit follows the state this node sends and receives
on its own streams (a push-pull carries the whole cluster state, so a peer's
is about as large as ours), never below UNAUTHENTICATED_FLOOR nor above
MAX_STREAM.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import struct
from collections import Counter
from collections.abc import Callable
from typing import Any

from gossip import codec, security
from gossip.admission import Admission, Ticket
from gossip.errors import DecodeError, EncodeError
from gossip.members import Event
from gossip.membership import Membership
from gossip.messages import Ack, Addr, Packet, Ping, PushPull, StreamRequest

log = logging.getLogger(__name__)

MAX_STREAM = 20 << 20  # memberlist's bound on a push-pull
#: No sender of ours makes a datagram near this: the core fills 1,400 bytes.
MAX_PACKET = 16 << 10
RECEIVE_BUFFER = 4 << 20  # room for a burst while the loop is busy
MAX_INBOUND_STREAMS = 128  # memberlist: at most 128 push-pulls in flight (authenticated)
#: Streams from one source address at a time, strangers and members alike.
MAX_STREAMS_PER_SOURCE = 8
#: Strangers at a time (one more evicts the oldest), and the bytes of their first frames
#: (room for one frame of MAX_STREAM).
MAX_UNAUTHENTICATED = 256
UNAUTHENTICATED_BYTES = 32 << 20
#: A stranger's length prefix must come within this many seconds ...
AUTH_TIMEOUT = 1.0
#: ... and its frame within AUTH_TIMEOUT + size / AUTH_RATE more (a LAN moves 100 MiB/s).
AUTH_RATE = 8 << 20
#: A stranger may announce a first frame this large even when this node has no state (its
#: zlib'd records: ~60 bytes each, so some 60,000 records); beyond it, up to STATE_MARGIN
#: times the largest frame of its own streams, or of its own state when it started.
UNAUTHENTICATED_FLOOR = 4 << 20
STATE_MARGIN = 2
_LENGTH = struct.Struct("!I")

EventSink = Callable[[Event], None]


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, shell: GossipShell) -> None:
        self.shell = shell

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.shell.receive_packet(data, (str(addr[0]), int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        self.shell.drops["send_error"] += 1


class GossipShell:
    def __init__(
        self,
        core: Membership,
        host: str,
        port: int,
        *,
        keyring: security.Keyring | None = None,
        label: bytes = b"",
        on_event: EventSink | None = None,
        tcp_timeout: float = 10.0,
        verify_incoming: bool = True,
        verify_outgoing: bool = True,
    ) -> None:
        self.core = core
        self.host, self.port = host, port
        self.keyring = keyring
        self.label = label
        #: with a keyring: drop plaintext (True), or also take it while a cluster
        #: moves to encryption (memberlist's GossipVerifyIncoming)
        self.verify_incoming = verify_incoming
        #: with a keyring: send encrypted (True), or plaintext while a cluster moves
        #: to encryption (memberlist's GossipVerifyOutgoing)
        self.verify_outgoing = verify_outgoing
        self.on_event = on_event or (lambda _event: None)
        self.tcp_timeout = tcp_timeout
        self.drops: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()
        #: UDP messages by type ("ping", "alive", ...; a compound's parts each), per direction
        self.messages_in: Counter[str] = Counter()
        self.messages_out: Counter[str] = Counter()
        #: UDP datagram bytes as sent and received (sealed: what the wire carries)
        self.bytes_in = 0
        self.bytes_out = 0
        #: TCP stream bytes (push-pulls and fallback pings, length prefix included) read and
        #: written, on the streams this node opened and on those it served
        self.stream_bytes_in = 0
        self.stream_bytes_out = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._timer: asyncio.TimerHandle | None = None
        #: the core's deadline `_timer` was armed for
        self._timer_at: float | None = None
        #: called after every datagram and timer this shell handles: the agent's periodic
        #: upkeep rides these wake-ups instead of taking its own (mesh.core.upkeep)
        self.on_wake: Callable[[], None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.admission = Admission(
            self.drops,
            per_source=MAX_STREAMS_PER_SOURCE,
            unauthenticated=MAX_UNAUTHENTICATED,
            unauthenticated_bytes=UNAUTHENTICATED_BYTES,
            authenticated=MAX_INBOUND_STREAMS,
        )
        # The largest frame sent, or received on a stream this node opened: the state's size.
        self._largest_frame = 0
        self._closing = False

    def __repr__(self) -> str:
        return f"<GossipShell {self.host}:{self.port} drops={sum(self.drops.values())}>"

    def _wrap(self, data: bytes) -> bytes:
        return security.wrap(data, self.keyring, self.label, verify_outgoing=self.verify_outgoing)

    def _unwrap(self, data: bytes) -> bytes:
        return security.unwrap(data, self.keyring, self.label, verify_incoming=self.verify_incoming)

    def now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        transport, _ = await self._loop.create_datagram_endpoint(
            lambda: _Datagrams(self), local_addr=(self.host, self.port), reuse_port=False
        )
        self._udp = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        try:
            self._tcp = await asyncio.start_server(
                self._serve_stream, self.host, self.port, reuse_address=True
            )
        except OSError:
            self._udp.close()
            raise
        self._size_own_state()
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
        self.bytes_in += len(data)
        if len(data) > MAX_PACKET:
            self.drops["oversized"] += 1
            return
        try:
            plain = self._unwrap(data)
            messages = codec.decode_packet(plain)
        except DecodeError as exc:
            self.drops[exc.reason] += 1
            return
        except Exception as exc:  # a bug in a decoder must cost one packet only
            self.drops["internal_error"] += 1
            log.exception("gossip packet from %s: %r", source, exc)
            return
        for message in messages:
            self.messages_in[type(message).__name__.lower()] += 1
        self.core.handle_packet(messages, source, self.now())
        self._drive()

    async def _serve_stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        peer = writer.get_extra_info("peername") or ("", 0)
        source = (str(peer[0]), int(peer[1]))
        ticket = self.admission.admit(source[0], writer.transport.abort)
        if ticket is None:
            writer.close()
            return
        try:
            message = await self._read_first_frame(reader, ticket)
            if message is None or not self.admission.authenticate(ticket):
                return
            reply = self.core.handle_stream(message, source, self.now())
            if reply is None:  # a TCP ping meant for another node
                return
            frame = self._frame(codec.encode_stream(reply))
            writer.write(frame)
            await asyncio.wait_for(writer.drain(), self.tcp_timeout)
            self.stream_bytes_out += len(frame)
            self._drive()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            if not ticket.evicted:  # an eviction was counted as one
                self.drops["stream_failed"] += 1
        finally:
            self.admission.release(ticket)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _size_own_state(self) -> None:
        """Size strangers' frames by the state this node starts with (loaded from disk):
        the members it would take a push-pull from hold about as much."""
        try:
            self._frame(codec.encode_stream(self.core.push_pull_state()))
        except EncodeError:  # more than MAX_STREAM: the limit is MAX_STREAM
            self._largest_frame = MAX_STREAM

    def unauthenticated_limit(self) -> int:
        """The largest first frame a stranger may announce: about the state's size."""
        return min(MAX_STREAM, max(UNAUTHENTICATED_FLOOR, STATE_MARGIN * self._largest_frame))

    async def _read_first_frame(
        self, reader: asyncio.StreamReader, ticket: Ticket
    ) -> PushPull | Ping | None:
        """A stranger's first frame, opened; None when it is dropped (counted)."""
        try:
            header = await asyncio.wait_for(reader.readexactly(_LENGTH.size), AUTH_TIMEOUT)
            (size,) = _LENGTH.unpack(header)
            if size > self.unauthenticated_limit():  # refused before it is buffered
                self.drops["oversized"] += 1
                return None
            if not self.admission.reserve(ticket, size):
                return None
            data = await asyncio.wait_for(reader.readexactly(size), AUTH_TIMEOUT + size / AUTH_RATE)
            self.stream_bytes_in += _LENGTH.size + size
        except TimeoutError:
            self.drops["unauthenticated_timeout"] += 1
            return None
        message = self._open(data)
        if message is not None and not isinstance(message, PushPull | Ping):
            self.drops["unexpected_stream"] += 1
            return None
        return message

    async def _read_reply(self, reader: asyncio.StreamReader) -> PushPull | Ping | Ack | None:
        """The answer on a stream this node opened, to a peer it chose: up to MAX_STREAM."""
        (size,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
        if size > MAX_STREAM:
            self.drops["oversized"] += 1
            return None
        data = await reader.readexactly(size)
        self.stream_bytes_in += _LENGTH.size + size
        message = self._open(data)
        if message is not None:
            self._largest_frame = max(self._largest_frame, size)
        return message

    def _open(self, data: bytes) -> PushPull | Ping | Ack | None:
        try:
            message = codec.decode_stream(self._unwrap(data))
        except DecodeError as exc:
            self.drops[exc.reason] += 1
            return None
        if not isinstance(message, PushPull | Ping | Ack):
            self.drops["unexpected_stream"] += 1
            return None
        return message

    def _frame(self, payload: bytes) -> bytes:
        sealed = self._wrap(payload)
        self._largest_frame = max(self._largest_frame, len(sealed))
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
        if self.on_wake is not None:
            self.on_wake()

    def _send(self, packet: Packet) -> None:
        if self._udp is None or not packet.messages:
            return
        try:
            data = self._wrap(codec.encode_packet(list(packet.messages)))
            self._udp.sendto(data, packet.to)
            self.counts["packets_out"] += 1
            self.bytes_out += len(data)
            for message in packet.messages:
                self.messages_out[type(message).__name__.lower()] += 1
        except (OSError, ValueError) as exc:
            self.drops["send_error"] += 1
            log.debug("gossip send to %s failed: %r", packet.to, exc)

    async def _open_stream(self, request: StreamRequest) -> None:
        reply: PushPull | Ping | Ack | None = None
        writer: asyncio.StreamWriter | None = None
        try:
            reader, stream = await asyncio.wait_for(
                asyncio.open_connection(*request.to, local_addr=self._local_addr(request.to)),
                self.tcp_timeout,
            )
            writer = stream
            frame = self._frame(codec.encode_stream(request.message))
            stream.write(frame)
            await asyncio.wait_for(stream.drain(), self.tcp_timeout)
            self.stream_bytes_out += len(frame)
            reply = await asyncio.wait_for(self._read_reply(reader), self.tcp_timeout)
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

    def _local_addr(self, to: Addr) -> tuple[str, int] | None:
        """Dial from the advertise address: peers count streams per source address, and
        agents sharing a host (or a host with several addresses) are told apart by it."""
        try:
            here, there = ipaddress.ip_address(self.host), ipaddress.ip_address(to[0])
        except ValueError:
            return None
        if here.is_unspecified or here.version != there.version:
            return None
        return (self.host, 0)

    def _arm_timer(self) -> None:
        deadline = self.core.next_timer()
        if self._timer is not None:
            if deadline == self._timer_at:
                # most datagrams (an ack, a ping answered) leave the next probe or gossip
                # tick where it was: the armed timer stands, no cancel and re-arm
                return
            self._timer.cancel()
            self._timer = None
        if deadline is not None and self._loop is not None:
            self._timer = self._loop.call_at(deadline, self._on_timer)
            self._timer_at = deadline

    def _on_timer(self) -> None:
        self._timer = None
        self.core.handle_timer(self.now())
        self._drive()
