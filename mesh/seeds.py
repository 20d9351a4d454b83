"""The join seeds behind a DNS name, asked with aiodns (c-ares): the thin shell of
`mesh.retryjoin`.

A name is asked for an SRV record `_mesh._tcp.<name>` first: when there is one,
its targets (in RFC 2782 order) with their ports are the seeds. Otherwise the
name's own addresses (A and AAAA, and the hosts file, as getaddrinfo gives them)
with the port of `--join`. The resolver is the host's (/etc/resolv.conf), or the
one `--join-resolver` names.
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Sequence
from dataclasses import dataclass

import aiodns
import aiodns.error
import pycares

from mesh.core.net import HostPort
from mesh.retryjoin import SrvTarget, order_srv, srv_name

#: seconds one query may take (c-ares retries within it)
QUERY_TIMEOUT = 2.0
QUERY_TRIES = 2


class ResolveError(Exception):
    """A name that gave no address this round (the reason is one short phrase)."""


@dataclass(frozen=True, slots=True)
class Resolved:
    seeds: list[tuple[str, int]]
    #: name -> why it gave nothing this round
    failures: dict[str, str]


class SeedResolver:
    """Resolves `--join` names; made in the running loop, closed by `close`."""

    def __init__(self, nameservers: Sequence[HostPort] = (), rng: random.Random | None = None):
        self._nameservers = [str(n) for n in nameservers]
        self._rng = rng or random.Random()
        self._resolver: aiodns.DNSResolver | None = None

    def _channel(self) -> aiodns.DNSResolver:
        if self._resolver is None:
            self._resolver = aiodns.DNSResolver(
                nameservers=self._nameservers or None,
                loop=asyncio.get_running_loop(),
                timeout=QUERY_TIMEOUT,
                tries=QUERY_TRIES,
            )
        return self._resolver

    async def resolve_all(self, names: Sequence[HostPort]) -> Resolved:
        """Every name at once; a name that fails does not stop the others."""
        results = await asyncio.gather(*(self.resolve(n) for n in names), return_exceptions=True)
        seeds: list[tuple[str, int]] = []
        failures: dict[str, str] = {}
        for name, result in zip(names, results, strict=True):
            if isinstance(result, ResolveError):
                failures[name.host] = str(result)
            elif isinstance(result, Exception):
                # Whatever c-ares raised (a channel that could not be made, say): this
                # round failed for this name, the join goes on.
                failures[name.host] = f"{type(result).__name__}: {result}"
            elif isinstance(result, BaseException):
                raise result  # cancelled: the agent is stopping
            else:
                seeds += result
        return Resolved(seeds, failures)

    async def resolve(self, name: HostPort) -> list[tuple[str, int]]:
        """The seeds behind one name: its SRV targets, else its addresses."""
        targets = await self._srv(name.host)
        if targets:
            seeds: list[tuple[str, int]] = []
            reasons = []
            for target in targets:
                try:
                    seeds += [(a, target.port) for a in await self._addresses(target.target)]
                except ResolveError as exc:
                    reasons.append(f"{target.target}: {exc}")
            if not seeds:
                raise ResolveError("SRV targets gave no address (" + "; ".join(reasons) + ")")
            return seeds
        return [(a, name.port) for a in await self._addresses(name.host)]

    async def _srv(self, host: str) -> list[SrvTarget]:
        try:
            result = await self._channel().query_dns(srv_name(host), "SRV")
        except aiodns.error.DNSError:
            return []  # no SRV record (or no answer): the name's own addresses
        answers = [
            SrvTarget(r.data.priority, r.data.weight, r.data.port, r.data.target)
            for r in result.answer
            # an answer may hold a CNAME first
            if isinstance(r.data, pycares.SRVRecordData)
        ]
        return order_srv(answers, self._rng)

    async def _addresses(self, host: str) -> list[str]:
        try:
            result = await self._channel().getaddrinfo(
                host, family=socket.AF_UNSPEC, type=socket.SOCK_STREAM
            )
        except aiodns.error.DNSError as exc:
            raise ResolveError(_reason(exc)) from None
        addresses = [node.addr[0].decode() for node in result.nodes]
        if not addresses:
            raise ResolveError("no address")
        return list(dict.fromkeys(addresses))

    async def close(self) -> None:
        if self._resolver is not None:
            await self._resolver.close()
            self._resolver = None


def _reason(exc: aiodns.error.DNSError) -> str:
    args = exc.args
    return str(args[1]) if len(args) > 1 else str(exc)
