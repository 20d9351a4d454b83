"""Upstream resolvers: which they are, and which to ask next (sans-IO, injected clock).

`Upstream` and its parsers (`parse_upstream` for `--dns-upstream`,
`upstreams_from_resolv_conf` for the host's resolvers) say *which*
upstreams there are; `UpstreamPool` says *in what order* to ask them for one
query, and remembers the ones that just failed, so that a dead upstream costs
its timeout once per back-off period instead of on every query.

The back-off rule:

- an attempt that timed out, hit a network error (connection refused, ICMP
  port or host unreachable, reset) or got REFUSED marks its upstream *down*;
  any other reply (an answer, NXDOMAIN, SERVFAIL, a truncated or even a
  malformed reply) shows that it is alive and clears its record. SERVFAIL is
  not held against an upstream: it is often about one name (a broken zone,
  a DNSSEC failure), not about the server;
- a down upstream is skipped until its back-off ends: `backoff_base`
  seconds after its first failure, doubled on each further failure, at most
  `backoff_max`. Only a failure of an attempt that *started* after the last
  recorded failure raises the back-off: the queries that were already
  waiting on a dead upstream when it was found dead say nothing new;
- each query tries the upstreams that are not down, in their configured
  order. When every upstream is down, it still tries the one whose back-off
  ends first (one attempt, not all of them), rather than answer SERVFAIL
  without asking anyone: an upstream back from the dead is found by the next
  query, and the worst case is one timeout per query instead of one per
  upstream.

The pool reads time only through `clock` (monotonic seconds).
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from mesh.core import net

#: glibc's MAXNS and Swarm's maxExtDNS: further nameservers are ignored.
MAX_UPSTREAMS: Final = 3
DNS_PORT: Final = 53
#: How long a failed upstream is skipped: the first back-off, and its cap.
BACKOFF_BASE: Final = 5.0
BACKOFF_MAX: Final = 120.0


def _canonical_ip(text: str) -> str:
    """The canonical text of an IP literal (an IPv6 zone id kept); ValueError if it is not one."""
    return str(ipaddress.ip_address(text))


@dataclass(frozen=True, slots=True)
class Upstream:
    """An upstream resolver: an IP literal (never a name, which would need DNS) and a port."""

    host: str
    port: int = DNS_PORT

    def __post_init__(self) -> None:
        object.__setattr__(self, "host", _canonical_ip(self.host))
        if not 0 < self.port < 65536:
            raise ValueError(f"port out of range: {self.port}")

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_upstream(text: str) -> Upstream:
    """Parse a `--dns-upstream` value: `ADDR`, `ADDR:PORT`, `[V6ADDR]` or `[V6ADDR]:PORT`.

    A bare IPv6 address (several colons, no brackets) is taken with port 53.
    Raises ValueError on anything else, names included.
    """
    host, port, bracketed = net.split_host_port(text, "upstream")  # AddressError: ValueError
    if bracketed and ":" not in host:
        raise ValueError(f"bad upstream {text.strip()!r}: expected [IPv6]:PORT")
    if (
        not bracketed
        and port is not None
        and not isinstance(ipaddress.ip_address(host), ipaddress.IPv4Address)
    ):
        raise ValueError(f"bad upstream {text.strip()!r}")
    return Upstream(host, DNS_PORT if port is None else net.parse_port(port, "upstream port"))


def _exclusion(text: str) -> str | None:
    """An `exclude` entry as a canonical address: `ADDR` or any `parse_upstream` form."""
    try:
        return parse_upstream(text).host
    except ValueError:
        return None


def _nameserver(line: str) -> str | None:
    """The canonical address of a `nameserver` line, or None for any other or unusable line.

    As glibc and musl, the keyword must start the line; whatever follows the
    address (a comment, say) is ignored, and so is a line whose address does
    not parse (a name, a truncated address).
    """
    fields = line.split()
    if len(fields) < 2 or fields[0] != "nameserver" or not line.startswith("nameserver"):
        return None
    address = fields[1].split("#", 1)[0].split(";", 1)[0]
    try:
        return _canonical_ip(address)
    except ValueError:
        return None


def upstreams_from_resolv_conf(
    path: str = "/etc/resolv.conf", exclude: Collection[str] = ()
) -> list[Upstream]:
    """The host's resolvers, in order: the `nameserver` lines of `path`, port 53.

    Addresses in `exclude` are skipped (compared as addresses, any port
    ignored: resolv.conf servers are on 53) — the agent passes its own DNS
    address and 127.0.0.11, so that it never forwards to itself. Excluded and
    duplicate entries do not use up one of the at most `MAX_UPSTREAMS` slots.
    A missing file gives no upstreams (the caller decides on a fallback);
    other read errors propagate.
    """
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    skip = {host for host in map(_exclusion, exclude) if host is not None}
    found: list[Upstream] = []
    for line in text.splitlines():
        host = _nameserver(line)
        if host is None or host in skip:
            continue
        skip.add(host)
        found.append(Upstream(host))
        if len(found) == MAX_UPSTREAMS:
            break
    return found


# --------------------------------------------------------------------------- failover


@dataclass(slots=True)
class _Down:
    """What the pool remembers of an upstream that failed."""

    failures: int  # consecutive failures that raised the back-off
    failed_at: float  # when the last of them was recorded
    until: float  # skipped before this time


class UpstreamPool:
    """The upstreams in order, with the memory of the ones that failed (the back-off rule above)."""

    def __init__(
        self,
        upstreams: Sequence[Upstream],
        *,
        clock: Callable[[], float] = time.monotonic,
        backoff_base: float = BACKOFF_BASE,
        backoff_max: float = BACKOFF_MAX,
    ) -> None:
        if backoff_base < 0 or backoff_max < backoff_base:
            raise ValueError("back-off: need 0 <= backoff_base <= backoff_max")
        self.upstreams = tuple(upstreams)
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._clock = clock
        self._down: dict[Upstream, _Down] = {}
        #: upstreams passed over because they were down (once per query and upstream)
        self.skipped = 0
        #: failures that started or lengthened a back-off
        self.backoffs = 0

    def now(self) -> float:
        return self._clock()

    def plan(self) -> list[Upstream]:
        """The upstreams to try for one query, in order (empty only if none is configured)."""
        if not self._down:
            return list(self.upstreams)
        now = self._clock()
        ready = [u for u in self.upstreams if not self._is_down(u, now)]
        self.skipped += len(self.upstreams) - len(ready)
        if ready or not self.upstreams:
            return ready
        soonest = min(self.upstreams, key=lambda u: self._down[u].until)
        self.skipped -= 1  # it is tried after all
        return [soonest]

    def failed(self, upstream: Upstream, started: float) -> None:
        """An attempt begun at `started` (this pool's clock) timed out, errored or was refused."""
        now = self._clock()
        down = self._down.get(upstream)
        if down is None:
            self._down[upstream] = _Down(1, now, now + self.backoff_base)
        elif started >= down.failed_at:  # news: it was tried again and failed again
            down.failures += 1
            down.failed_at = now
            backoff = min(self.backoff_max, self.backoff_base * 2 ** (down.failures - 1))
            down.until = now + backoff
        else:  # an attempt that was already waiting when it was found dead
            return
        self.backoffs += 1

    def succeeded(self, upstream: Upstream) -> None:
        """It answered: forget its failures."""
        if self._down:
            self._down.pop(upstream, None)

    def down(self) -> list[Upstream]:
        """The upstreams in back-off now."""
        now = self._clock()
        return [u for u in self.upstreams if self._is_down(u, now)]

    def backoff_left(self, upstream: Upstream) -> float:
        """Seconds until `upstream` is tried again (0 if it is not down)."""
        down = self._down.get(upstream)
        return 0.0 if down is None else max(0.0, down.until - self._clock())

    def _is_down(self, upstream: Upstream, now: float) -> bool:
        down = self._down.get(upstream)
        return down is not None and now < down.until
