"""A small, real DNS server (UDP and TCP, one port) to stand for an upstream resolver in tests.

`FakeUpstream` answers A queries from a dict of names to addresses, NXDOMAIN
(with an SOA, so that it may be cached negatively) for every other name, and
NODATA for other types of a known name. It runs its own asyncio loop in a
thread, so sync tests, async tests and tests in other event loops (uvloop)
can all use it: `with FakeUpstream(...) as up:` or `async with`.

Knobs, which a test may change while the server runs (they are plain
attributes, read per query):

- `delay`: seconds to wait before each reply (each query waits on its own:
  a slow reply never holds up the next query);
- `dead`: drop every query, UDP and TCP (TCP connections are accepted and
  read, never answered: a black hole, not a refusal); `tcp_dead` only TCP;
- `truncate_udp`: answer every UDP query with TC set and no records (UDP
  answers larger than 512 bytes, or the query's EDNS size, are truncated in
  any case, as a real server does);
- `rcode`: answer every query with this rcode and no records (2 SERVFAIL,
  5 REFUSED, ...);
- `forge`: before each real UDP reply, send a forged one: "id" (wrong ID)
  or "question" (right ID, another name), both with the address `FORGED`;
- `malformed`: answer with the query's ID followed by bytes that are not DNS.

Every query received is recorded in `queries` (transport, name, type, ID).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

from dnslib import EDNS0, QTYPE, RR, SOA, A, DNSRecord

FORGED = "6.6.6.6"
UDP_LIMIT = 512  # RFC 1035 §4.2.1, for queries without EDNS
STOP_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class Seen:
    """One query the server received."""

    transport: Literal["udp", "tcp"]
    name: str  # lower case, no trailing dot
    qtype: str
    id: int


def _name(qname: Any) -> str:
    return str(qname).rstrip(".").lower()


class FakeUpstream:
    def __init__(
        self,
        records: Mapping[str, Sequence[str]] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ttl: int = 60,
        negative_ttl: int = 30,
    ) -> None:
        self.records = {
            name.rstrip(".").lower(): list(addrs) for name, addrs in (records or {}).items()
        }
        self.host = host
        self.port = port
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.delay = 0.0
        self.dead = False
        self.tcp_dead = False
        self.truncate_udp = False
        self.rcode: int | None = None
        self.forge: Literal["id", "question"] | None = None
        self.malformed = False
        self.queries: list[Seen] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: Exception | None = None
        self._thread: threading.Thread | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    # ------------------------------------------------------------------ life cycle

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def start(self) -> FakeUpstream:
        """Bind UDP and TCP on one port (port 0: a free one, read back into `port`) and serve.

        The server's loop lives in its own thread from start to end, so this
        may be called from sync code and from inside any running event loop.
        """
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), daemon=True, name="fake-dns-upstream"
        )
        self._thread.start()
        ready.wait(STOP_TIMEOUT)
        if self._error is not None:
            self._thread.join(STOP_TIMEOUT)
            self._thread = None
            raise self._error
        return self

    def stop(self) -> None:
        """Stop serving and close every socket (idempotent)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(STOP_TIMEOUT)
        self._thread = None

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> FakeUpstream:
        return await asyncio.to_thread(self.start)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)

    def count(self, transport: Literal["udp", "tcp"] | None = None, name: str | None = None) -> int:
        """How many queries arrived (over `transport`, for `name`, when given)."""
        return sum(
            1
            for seen in list(self.queries)
            if (transport is None or seen.transport == transport)
            and (name is None or seen.name == name.rstrip(".").lower())
        )

    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._open())
        except Exception as exc:
            self._error = exc
        else:
            self._loop = loop
        ready.set()
        try:
            if self._error is None:
                loop.run_forever()
        finally:
            loop.run_until_complete(self._shutdown())
            self._loop = None
            loop.close()

    async def _open(self) -> None:
        # With port 0, UDP picks a free port and TCP must get the same one;
        # in the rare case another socket holds it for TCP, try another.
        for _ in range(20):
            loop = asyncio.get_running_loop()
            self._udp, _ = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self), local_addr=(self.host, self.port)
            )
            port: int = self._udp.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._handle_tcp, self.host, port)
            except OSError:
                self._udp.close()
                if self.port:
                    raise
                continue
            self.port = port
            return
        raise OSError("no port free for both UDP and TCP")

    async def _shutdown(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self._tcp is not None:
            await self._tcp.wait_closed()
        await asyncio.sleep(0)  # let closed transports call connection_lost

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ answering

    def answer(self, query: Any, *, udp: bool) -> bytes:
        """The reply to a parsed query, after the knobs."""
        reply = query.reply(ra=1, aa=0)
        reply.header.ad = 0  # nothing here is validated
        opt = next((rr for rr in query.ar if rr.rtype == QTYPE.OPT), None)
        if opt is not None:
            reply.add_ar(EDNS0(udp_len=4096))
        if self.rcode is not None:
            reply.header.rcode = self.rcode
            return bytes(reply.pack())
        question = query.q
        addresses = self.records.get(_name(question.qname))
        if addresses is None:
            reply.header.rcode = 3  # NXDOMAIN
            reply.add_auth(self._soa())
        elif question.qtype in (QTYPE.A, QTYPE.ANY):
            for address in addresses:
                reply.add_answer(RR(question.qname, QTYPE.A, rdata=A(address), ttl=self.ttl))
        else:
            reply.add_auth(self._soa())  # NODATA
        wire = bytes(reply.pack())
        limit = max(UDP_LIMIT, int(opt.edns_len)) if opt is not None else UDP_LIMIT
        if udp and (self.truncate_udp or len(wire) > limit):
            reply.rr, reply.auth = [], []
            reply.header.tc = 1
            wire = bytes(reply.pack())
        return wire

    def _soa(self) -> Any:
        times = (1, 3600, 600, 86400, self.negative_ttl)
        return RR(
            "test.", QTYPE.SOA, ttl=self.negative_ttl, rdata=SOA("ns.test.", "admin.test.", times)
        )

    def _forged(self, query: Any) -> bytes:
        forged = DNSRecord.parse(query.pack())
        reply = forged.reply(ra=1, aa=0)
        if self.forge == "id":
            reply.header.id = (query.header.id + 1) % 65536
        else:
            reply.questions[0].qname = "forged.invalid."
        reply.add_answer(RR(reply.q.qname, QTYPE.A, rdata=A(FORGED), ttl=self.ttl))
        return bytes(reply.pack())

    def _received(self, data: bytes, transport: Literal["udp", "tcp"]) -> Any | None:
        """Parse and record a query; None when it is to go unanswered."""
        try:
            query = DNSRecord.parse(data)
        except Exception:
            return None
        if query.questions:
            self.queries.append(
                Seen(transport, _name(query.q.qname), QTYPE.get(query.q.qtype), query.header.id)
            )
        if self.dead or (transport == "tcp" and self.tcp_dead) or not query.questions:
            return None
        return query

    def _reply_bytes(self, data: bytes, query: Any, *, udp: bool) -> bytes:
        if self.malformed:
            return data[:2] + b"\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00\x07broken"
        return self.answer(query, udp=udp)

    async def _answer_udp(self, data: bytes, query: Any, addr: Any) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)
        if self._udp is not None and not self._udp.is_closing():
            self._udp.sendto(self._reply_bytes(data, query, udp=True), addr)

    def on_datagram(self, data: bytes, addr: Any) -> None:
        query = self._received(data, "udp")
        if query is None or self._udp is None:
            return
        if self.forge is not None:
            self._udp.sendto(self._forged(query), addr)
        self._spawn(self._answer_udp(data, query, addr))

    async def _handle_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            while True:
                size = int.from_bytes(await reader.readexactly(2), "big")
                data = await reader.readexactly(size)
                query = self._received(data, "tcp")
                if query is None:
                    continue
                if self.delay:
                    await asyncio.sleep(self.delay)
                reply = self._reply_bytes(data, query, udp=False)
                writer.write(len(reply).to_bytes(2, "big") + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            if task is not None:
                self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: FakeUpstream) -> None:
        self.server = server

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.server.on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:  # ICMP about earlier replies: no matter
        pass
