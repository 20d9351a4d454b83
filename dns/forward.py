"""Forwarding of the names the mesh does not own to the host's upstream resolvers.

Theory of operation. The responder answers the mesh's own names from its views
and hands every other query, as the client's wire bytes, to
`Forwarder.forward`, which returns the wire reply for that client: the
client's ID and question, always a well-formed DNS message. The semantics are
moby's current embedded resolver (reference/swarm-behavior.md §1.5), plus a
small cache and the memory of dead upstreams:

- upstreams are tried in order (at most three, as glibc and Swarm's
  `maxExtDNS`), each with its own `timeout`; SERVFAIL or REFUSED from one, a
  timeout, a network error or a malformed reply moves on to the next; any
  other answer, NXDOMAIN included, goes back to the client as it came;
- an upstream that timed out, errored or REFUSED is skipped for a back-off
  period (exponential, capped, reset when it answers); when every upstream
  is in back-off, the one whose back-off ends first is still tried
  (`dns.upstreams` states the rule);
- the query is relayed as the client sent it (flags, EDNS, case), under a
  fresh random ID; a reply counts only when its ID and its question match, so
  stray and forged datagrams are ignored, not believed;
- UDP first, then TCP on the same upstream when the UDP reply is truncated
  (TC), so the client gets the full answer; a client that came over TCP is
  forwarded over TCP directly. A reply larger than the client's UDP limit is
  the responder's to truncate, as it does for local answers;
- when every upstream fails the client gets SERVFAIL (moby; libnetwork sent
  nothing and let the client time out), and with none configured at once;
- at most `max_in_flight` queries wait on upstreams (moby's 1024); beyond
  that the answer is REFUSED at once, so a dead upstream cannot pile up
  unbounded sockets and tasks;
- answers are cached for their TTL (`ForwardCache`), negative ones per
  RFC 2308, so a burst of identical lookups costs one upstream query.

Three layers, the first two sans-IO and free of any clock of their own:
`dns.upstreams` (which upstreams, in what order, which are down),
`dns.relay` (what a query and a reply mean: `parse_query`, `judge_reply`,
`error_reply`) with `dns.forward_cache` (`ForwardCache`, `cache_ttl`), and
this module, the thin asyncio shell that moves the bytes.

Each UDP attempt uses its own connected datagram socket rather than one
shared socket with an ID map. A connected socket gets a fresh ephemeral source
port per query (with the random ID, ~32 bits a forger must guess instead of
16, the defence against Kaminsky-style poisoning), the kernel drops datagrams
from any other address, an ICMP port-unreachable surfaces as an error so a
stopped upstream fails over at once instead of after `timeout`, and there is
no demultiplexing table to leak or to collide in. The cost, one socket per
forwarded query, is bounded by `max_in_flight`; this path is not the hot one.

The shell spawns one task per forwarded query: no lock is shared between
queries, so a dead upstream only ever delays the queries that wait on it.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from typing import Any, Final

from dns.forward_cache import ForwardCache
from dns.relay import (
    OPCODE_QUERY,
    Action,
    MalformedQuery,
    Query,
    Verdict,
    error_reply,
    judge_reply,
    parse_query,
)
from dns.upstreams import BACKOFF_BASE, BACKOFF_MAX, Upstream, UpstreamPool
from dns.wire import NOTIMP, REFUSED, SERVFAIL

#: the upstream query IDs: os.urandom, as `secrets` draws them (RFC 5452 §9.2), without
#: `secrets`' import of hmac and OpenSSL's libcrypto (~3 MB in a DNS worker)
_ID_SOURCE: Final = random.SystemRandom()

__all__ = ["STAT_NAMES", "Forwarder", "MalformedQuery", "Upstream"]

#: Every counter `Forwarder.stats` reports, so that metrics have stable names.
STAT_NAMES: Final = (
    "queries",  # queries handed to forward() that parsed
    "answered_from_cache",
    "forwarded",  # cache misses sent upstream
    "answered_upstream",  # an upstream's reply went back to the client
    "answered_truncated",  # ... a truncated one, its TCP retry having failed
    "servfail",  # SERVFAIL we made up: every upstream failed, or none
    "refused_over_cap",  # REFUSED: max_in_flight queries were already waiting
    "notimp",  # not a standard query (opcode), NOTIMP
    "truncated_retried_tcp",
    "upstream_timeouts",  # attempts, not queries
    "upstream_errors",  # network errors and unusable replies
    "upstream_servfail",
    "upstream_refused",
    "malformed_replies",  # unparsable replies (also counted in upstream_errors)
    "ignored_replies",  # wrong ID or question: stray or forged
    "upstream_skipped",  # an upstream passed over for a query: it was in back-off
    "upstream_backoffs",  # failures that put an upstream in back-off or lengthened it
)

#: A verdict's reason -> the outcome an attempt is counted under (`Forwarder.attempts`)
_OUTCOMES: Final = {"ok": "answered", "truncated": "truncated"}

#: Attempt outcomes that mark an upstream down; any other reply shows it alive.
_DOWN_REASONS: Final = frozenset({"timeout", "error", "refused"})


class _UdpExchange(asyncio.DatagramProtocol):
    """One query over one connected UDP socket: resolves `done` with the first verdict that counts.

    Datagrams judged IGNORE (stray, forged) are counted and waited past; an
    ICMP error (port unreachable: nothing listens there) fails the exchange.
    """

    def __init__(
        self,
        done: asyncio.Future[Verdict],
        judge: Callable[[bytes], Verdict],
        on_ignored: Callable[[], None],
    ) -> None:
        self._done = done
        self._judge = judge
        self._on_ignored = on_ignored

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        if self._done.done():
            return
        verdict = self._judge(data)
        if verdict.action is Action.IGNORE:
            self._on_ignored()
        else:
            self._done.set_result(verdict)

    def error_received(self, exc: Exception) -> None:
        if not self._done.done():
            self._done.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done.done():
            self._done.set_exception(exc or ConnectionError("UDP socket closed"))


class Forwarder:
    """Forwards queries to upstream resolvers, with failover, TCP retry, a cap and a cache.

    `clock` drives the cache and the upstreams' back-off; timeouts use the
    event loop's clock.
    Worst case, a query waits `timeout` per upstream (plus one more for a TCP
    retry after a truncated reply): keep `timeout` x upstreams under the
    clients' own timeout (glibc: 5 s) so that they see our SERVFAIL.
    """

    def __init__(
        self,
        upstreams: Sequence[Upstream],
        *,
        timeout: float = 2.0,
        max_in_flight: int = 1024,
        cache_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        backoff_base: float = BACKOFF_BASE,
        backoff_max: float = BACKOFF_MAX,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, not {timeout}")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, not {max_in_flight}")
        self._pool = UpstreamPool(
            upstreams, clock=clock, backoff_base=backoff_base, backoff_max=backoff_max
        )
        self._timeout = timeout
        self._max_in_flight = max_in_flight
        self._cache = ForwardCache(cache_entries, clock=clock)
        self._counts = dict.fromkeys(STAT_NAMES, 0)
        #: (upstream, outcome) -> attempts: `answered`, `truncated`, `servfail`, `refused`,
        #: `timeout`, `error`, `malformed`, `mismatch` (bounded: the upstreams are configured)
        self.attempts: dict[tuple[str, str], int] = {}
        self._in_flight = 0
        self._tasks: set[asyncio.Task[bytes]] = set()
        self._closed = False

    @property
    def upstreams(self) -> tuple[Upstream, ...]:
        return self._pool.upstreams

    @property
    def pool(self) -> UpstreamPool:
        return self._pool

    @property
    def cache(self) -> ForwardCache:
        return self._cache

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def stats(self) -> dict[str, int]:
        """The counters (`STAT_NAMES`); gauges: `in_flight`, `cache_entries`, `upstreams_down`."""
        return {
            **self._counts,
            "upstream_skipped": self._pool.skipped,
            "upstream_backoffs": self._pool.backoffs,
            "cache_evicted": self._cache.evicted,
            "in_flight": self._in_flight,
            "cache_entries": len(self._cache),
            "upstreams_down": len(self._pool.down()),
        }

    async def forward(self, query: bytes, *, tcp: bool = False) -> bytes:
        """The reply to a client's `query` (wire bytes), which came over TCP if `tcp`.

        Raises `MalformedQuery` if `query` is not a query; never raises for
        anything an upstream does. Cache hits, REFUSED over the cap and
        SERVFAIL without upstreams are answered without waiting.
        """
        parsed = parse_query(query)
        self._counts["queries"] += 1
        if parsed.opcode != OPCODE_QUERY:
            self._counts["notimp"] += 1
            return error_reply(parsed, NOTIMP)
        cached = self._cache.get(parsed)
        if cached is not None:
            self._counts["answered_from_cache"] += 1
            return cached
        if self._closed or not self._pool.upstreams:
            return self._servfail(parsed)
        if self._in_flight >= self._max_in_flight:
            self._counts["refused_over_cap"] += 1
            return error_reply(parsed, REFUSED)
        return await self._forward_miss(parsed, tcp)

    async def close(self) -> None:
        """Stop forwarding: queries waiting on upstreams get SERVFAIL, and so do later misses."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _forward_miss(self, query: Query, tcp: bool) -> bytes:
        # The upstream work runs in a task of its own so that close() can
        # cancel it without cancelling the caller, who still gets a reply.
        self._in_flight += 1
        self._counts["forwarded"] += 1
        task = asyncio.ensure_future(self._resolve(query, tcp))
        self._tasks.add(task)
        try:
            return await task
        except asyncio.CancelledError:
            caller = asyncio.current_task()
            if task.cancelled() and self._closed and (caller is None or not caller.cancelling()):
                return self._servfail(query)
            raise
        finally:
            self._in_flight -= 1
            self._tasks.discard(task)

    async def _resolve(self, query: Query, tcp: bool) -> bytes:
        """Try the upstreams the pool plans, in order; the first answer wins, else SERVFAIL."""
        fallback: bytes | None = None
        for upstream in self._pool.plan():
            started = self._pool.now()
            verdict = await self._ask(upstream, query, tcp)
            outcome = (str(upstream), _OUTCOMES.get(verdict.reason, verdict.reason))
            self.attempts[outcome] = self.attempts.get(outcome, 0) + 1
            if verdict.reason in _DOWN_REASONS:
                self._pool.failed(upstream, started)
            else:
                self._pool.succeeded(upstream)
            if verdict.action is Action.ACCEPT:
                self._counts["answered_upstream"] += 1
                self._cache.put(query, verdict.wire)
                return verdict.wire
            if verdict.action is Action.RETRY_TCP and fallback is None:
                fallback = verdict.wire
        if fallback is not None:
            # A truncated answer beats SERVFAIL: the client may get through over TCP itself.
            self._counts["answered_truncated"] += 1
            return fallback
        return self._servfail(query)

    async def _ask(self, upstream: Upstream, query: Query, tcp: bool) -> Verdict:
        """One upstream: UDP, then TCP if truncated (TCP at once for a TCP client).

        The TCP retry gets a fresh `timeout`: the upstream has just shown it
        is alive. If it fails, the truncated reply is returned as a fallback
        (RETRY_TCP) and the caller moves on.
        """
        if tcp:
            return await self._attempt(upstream, query, tcp=True)
        verdict = await self._attempt(upstream, query, tcp=False)
        if verdict.action is not Action.RETRY_TCP:
            return verdict
        self._counts["truncated_retried_tcp"] += 1
        retried = await self._attempt(upstream, query, tcp=True)
        return retried if retried.action is Action.ACCEPT else verdict

    async def _attempt(self, upstream: Upstream, query: Query, *, tcp: bool) -> Verdict:
        """One exchange with one upstream, under a fresh random ID, within `timeout`."""
        sent_id = _ID_SOURCE.getrandbits(16)
        wire = sent_id.to_bytes(2, "big") + query.wire[2:]
        try:
            async with asyncio.timeout(self._timeout):
                if tcp:
                    reply = await _exchange_tcp(upstream, wire)
                    verdict = judge_reply(query, sent_id, reply, tcp=True)
                else:
                    verdict = await _exchange_udp(
                        upstream,
                        wire,
                        lambda data: judge_reply(query, sent_id, data, tcp=False),
                        self._count_ignored,
                    )
        except TimeoutError:
            self._counts["upstream_timeouts"] += 1
            return Verdict(Action.NEXT, "timeout")
        except (OSError, EOFError):  # refused, reset, unreachable, cut short (IncompleteReadError)
            self._counts["upstream_errors"] += 1
            return Verdict(Action.NEXT, "error")
        return self._counted(verdict)

    def _counted(self, verdict: Verdict) -> Verdict:
        """Count a verdict; over TCP a reply that is not ours is this upstream's error."""
        if verdict.action is Action.IGNORE:
            verdict = Verdict(Action.NEXT, "mismatch")
        if verdict.action is Action.NEXT:
            if verdict.reason in ("servfail", "refused"):
                self._counts[f"upstream_{verdict.reason}"] += 1
            else:
                self._counts["upstream_errors"] += 1
                if verdict.reason == "malformed":
                    self._counts["malformed_replies"] += 1
        return verdict

    def _count_ignored(self) -> None:
        self._counts["ignored_replies"] += 1

    def _servfail(self, query: Query) -> bytes:
        self._counts["servfail"] += 1
        return error_reply(query, SERVFAIL)


async def _exchange_udp(
    upstream: Upstream,
    wire: bytes,
    judge: Callable[[bytes], Verdict],
    on_ignored: Callable[[], None],
) -> Verdict:
    """Send `wire` from a fresh connected UDP socket; the first reply `judge` does not ignore.

    The transport reads datagrams of up to 256 KiB (asyncio) or 64 KiB
    (uvloop), so an oversized answer from a server that ignores EDNS is
    received whole rather than cut at 512 bytes (moby asks with 65535 too).
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Verdict] = loop.create_future()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _UdpExchange(done, judge, on_ignored), remote_addr=(upstream.host, upstream.port)
    )
    try:
        transport.sendto(wire)
        return await done
    finally:
        transport.close()


async def _exchange_tcp(upstream: Upstream, wire: bytes) -> bytes:
    """Send `wire` over a new TCP connection and read one reply.

    Over TCP every message is preceded by its length as two bytes in network
    order (RFC 1035 §4.2.2). One query per connection: this path only serves
    truncated answers and TCP clients, and a fresh connection needs no
    pipelining bookkeeping (RFC 7766 allows either).
    """
    reader, writer = await asyncio.open_connection(upstream.host, upstream.port)
    try:
        writer.write(len(wire).to_bytes(2, "big") + wire)
        await writer.drain()
        size = int.from_bytes(await reader.readexactly(2), "big")
        return await reader.readexactly(size)
    finally:
        writer.close()
        with suppress(OSError):
            await writer.wait_closed()
