"""Retry-join, sans-IO: which seeds one join round tries, and when the next round is due.

`--join` names a node (`ADDR[:PORT]`) or a DNS name that resolves to several
(A/AAAA, or an SRV record `_mesh._tcp.<name>` that carries the ports too), as
Consul's `retry_join` does. A round resolves every name (`mesh.seeds`, the
aiodns shell), pushes-pulls with the seeds, and waits; a round in which no
other member answered is failed: it is logged once (one line per round, not
one per seed), and the next one comes after a bounded exponential back-off
with jitter (so the nodes of a DaemonSet that start together do not ask the
same seed in step). After `max_rounds` failed rounds (0: never) the agent
gives up.

Everything here is pure: the shell passes `now` in and sleeps as told.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from mesh.core.net import HostPort

#: The SRV service label of gossip: `_mesh._tcp.<name>`.
SRV_PREFIX = "_mesh._tcp."
#: At most this many seeds from one round's answers: a name that resolves to a
#: thousand addresses (a hostile or broken zone) costs a thousand connections otherwise.
MAX_SEEDS = 16


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def srv_name(host: str) -> str:
    return SRV_PREFIX + host.rstrip(".")


@dataclass(frozen=True, slots=True)
class SrvTarget:
    """One SRV answer (RFC 2782)."""

    priority: int
    weight: int
    port: int
    target: str


def order_srv(answers: Sequence[SrvTarget], rng: random.Random) -> list[SrvTarget]:
    """RFC 2782 order: lowest priority first; within one priority a weighted random
    order (a weight-0 answer can still be picked, only rarely). A target of "." means
    "no such service" and is dropped."""
    usable = [a for a in answers if a.target not in (".", "")]
    ordered: list[SrvTarget] = []
    for priority in sorted({a.priority for a in usable}):
        left = [a for a in usable if a.priority == priority]
        while left:
            total = sum(a.weight for a in left)
            if total == 0:
                pick = rng.randrange(len(left))
            else:
                point = rng.uniform(0, total)
                running = 0
                pick = len(left) - 1
                for index, answer in enumerate(left):
                    running += answer.weight
                    if point <= running and answer.weight:
                        pick = index
                        break
            ordered.append(left.pop(pick))
    return ordered


def pick_seeds(
    addresses: Sequence[tuple[str, int]], rng: random.Random, limit: int = MAX_SEEDS
) -> list[tuple[str, int]]:
    """The seeds of one round: each address once, in a random order (so the joiners spread
    over the seeds), at most `limit` of them."""
    unique = list(dict.fromkeys(addresses))
    rng.shuffle(unique)
    return unique[:limit]


@dataclass(frozen=True, slots=True)
class Backoff:
    """The wait after failed round `n` (1, 2, ...): first * factor**(n-1), at most ceiling,
    less up to `jitter` of it at random."""

    first: float = 1.0
    factor: float = 2.0
    ceiling: float = 30.0
    jitter: float = 0.2

    def delay(self, failed_rounds: int, rng: random.Random) -> float:
        exponent = min(max(failed_rounds - 1, 0), 64)  # no float overflow on a long outage
        base = min(self.first * self.factor**exponent, self.ceiling)
        return base * (1.0 - self.jitter * rng.random())


@dataclass(frozen=True, slots=True)
class RoundFailed:
    """What to do after a failed round."""

    round: int
    #: seconds until the next round
    delay: float
    #: True: this was the last round allowed (`--retry-join-max`)
    give_up: bool
    #: seconds since the first round began
    elapsed: float


@dataclass(slots=True)
class RetryJoin:
    """The rounds of one join: started at the first round, counted when they fail."""

    targets: tuple[HostPort, ...]
    #: failed rounds before giving up; 0: never give up
    max_rounds: int = 0
    backoff: Backoff = field(default_factory=Backoff)
    rng: random.Random = field(default_factory=random.Random)
    failed: int = 0
    started: float | None = None

    def begin_round(self, now: float) -> None:
        if self.started is None:
            self.started = now

    def names(self) -> list[HostPort]:
        """The targets that need DNS (the rest are seeds as they are)."""
        return [t for t in self.targets if not is_ip_literal(t.host)]

    def literal_seeds(self) -> list[tuple[str, int]]:
        return [(t.host, t.port) for t in self.targets if is_ip_literal(t.host)]

    def round_failed(self, now: float) -> RoundFailed:
        self.failed += 1
        return RoundFailed(
            round=self.failed,
            delay=self.backoff.delay(self.failed, self.rng),
            give_up=bool(self.max_rounds) and self.failed >= self.max_rounds,
            elapsed=now - (self.started if self.started is not None else now),
        )

    def joined(self, now: float) -> float:
        """Seconds the join took, from the first round."""
        return now - (self.started if self.started is not None else now)
