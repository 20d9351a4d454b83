"""The member table and its state machine: SWIM precedence as data, events, probe ring.

Precedence (SWIM §4.2, memberlist state.go aliveNode/suspectNode/deadNode):
an update about a member replaces what we hold when its incarnation is
higher, or when it is equal and its state ranks higher: ALIVE < SUSPECT <
DEAD < LEFT. So suspect overrides alive at the same incarnation, dead and
left override both, and a dead member comes back alive only with a higher
incarnation. `PRECEDENCE` spells this out per (held, incoming) pair, and a
test checks it is the lexicographic order on (incarnation, rank) — a join
semilattice, which is why any interleaving of updates converges.

Where we differ from memberlist: it ignores a Suspect or Dead about a member
it already holds as DEAD even at a higher incarnation; we accept it (it is
newer news), which keeps the order a lattice. LEFT outranks DEAD at the same
incarnation so a graceful leave is not overwritten by a failure verdict.

`MemberStates` is the one place the table changes for news about others:
it applies Alive/Suspect/Dead under PRECEDENCE, runs the Lifeguard
suspicion timers and reaps the long dead. News about ourselves never gets
here; the core refutes it.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from gossip.config import GossipConfig
from gossip.messages import Addr, Alive, Dead, MemberState, Suspect
from gossip.rota import ProbeRota
from gossip.suspicion import Suspicion

__all__ = [
    "PRECEDENCE",
    "Change",
    "Event",
    "MemberAlive",
    "MemberFailed",
    "MemberInfo",
    "MemberJoined",
    "MemberLeft",
    "MemberStates",
    "MemberSuspected",
    "MemberTable",
    "MemberUpdated",
    "ProbeRing",
    "k_random_members",
    "supersedes",
]

EXACT_SAMPLE_MAX = 64  # up to this many candidates, sample exactly; above, memberlist's 3n tries


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberInfo:
    """What we know of one member; `state_since` is the `now` of its last state change."""

    name: str
    addr: Addr
    state: MemberState
    incarnation: int
    meta: bytes = b""
    state_since: float = 0.0
    lateness: float = 0.0  # seconds it said it answers late, in its last Alive ...
    lateness_at: float = 0.0  # ... and our `now` when that Alive arrived (gossip/lateness.py)


@dataclass(frozen=True, slots=True)
class MemberJoined:
    """A member we did not know (memberlist NotifyJoin). Also emitted for ourselves at start."""

    member: MemberInfo


@dataclass(frozen=True, slots=True)
class MemberUpdated:
    """An alive member's address or meta changed (memberlist NotifyUpdate)."""

    member: MemberInfo


@dataclass(frozen=True, slots=True)
class MemberSuspected:
    """A member became SUSPECT; `by` is the accuser named in the Suspect message."""

    member: MemberInfo
    by: str


@dataclass(frozen=True, slots=True)
class MemberFailed:
    """A member was declared DEAD (failed, not left) (memberlist NotifyLeave)."""

    member: MemberInfo


@dataclass(frozen=True, slots=True)
class MemberLeft:
    """A member left gracefully (Dead with sender == node)."""

    member: MemberInfo


@dataclass(frozen=True, slots=True)
class MemberAlive:
    """A SUSPECT member refuted, or a DEAD/LEFT one rejoined with a higher incarnation."""

    member: MemberInfo


Event = MemberJoined | MemberUpdated | MemberSuspected | MemberFailed | MemberLeft | MemberAlive


class Order(enum.Enum):
    """How the incoming incarnation must compare with the held one for the update to win."""

    HIGHER = ">"
    HIGHER_OR_EQUAL = ">="


_A, _S, _D, _L = MemberState.ALIVE, MemberState.SUSPECT, MemberState.DEAD, MemberState.LEFT
_GT, _GE = Order.HIGHER, Order.HIGHER_OR_EQUAL
_GONE = (_D, _L)

PRECEDENCE: dict[tuple[MemberState, MemberState], Order] = {
    # (held, incoming): incoming wins when its incarnation is ...
    (_A, _A): _GT,
    (_A, _S): _GE,
    (_A, _D): _GE,
    (_A, _L): _GE,
    (_S, _A): _GT,
    (_S, _S): _GT,
    (_S, _D): _GE,
    (_S, _L): _GE,
    (_D, _A): _GT,
    (_D, _S): _GT,
    (_D, _D): _GT,
    (_D, _L): _GE,
    (_L, _A): _GT,
    (_L, _S): _GT,
    (_L, _D): _GT,
    (_L, _L): _GT,
}


def supersedes(held: MemberInfo, state: MemberState, incarnation: int) -> bool:
    """True when an update (state, incarnation) replaces `held` under PRECEDENCE."""
    if PRECEDENCE[held.state, state] is Order.HIGHER:
        return incarnation > held.incarnation
    return incarnation >= held.incarnation


class MemberTable:
    """Members by name in insertion order (deterministic iteration), with an address index."""

    __slots__ = ("_by_addr", "_by_name")

    def __init__(self) -> None:
        self._by_name: dict[str, MemberInfo] = {}
        self._by_addr: dict[Addr, str] = {}

    def get(self, name: str) -> MemberInfo | None:
        return self._by_name.get(name)

    def __getitem__(self, name: str) -> MemberInfo:
        return self._by_name[name]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __len__(self) -> int:
        return len(self._by_name)

    def __iter__(self) -> Iterator[MemberInfo]:
        return iter(self._by_name.values())

    def name_at(self, addr: Addr) -> str | None:
        """The member last seen at `addr` (for naming the relay of a User message)."""
        return self._by_addr.get(addr)

    def set(self, info: MemberInfo) -> None:
        old = self._by_name.get(info.name)
        if old is not None and old.addr != info.addr and self._by_addr.get(old.addr) == old.name:
            del self._by_addr[old.addr]
        self._by_name[info.name] = info
        self._by_addr[info.addr] = info.name

    def remove(self, name: str) -> None:
        info = self._by_name.pop(name)
        if self._by_addr.get(info.addr) == name:
            del self._by_addr[info.addr]


class ProbeRing:
    """SWIM round-robin over a randomly permuted member list, reshuffled on each wrap.

    Round-robin gives a worst-case bound on the time to first probe a failed
    member (SWIM §4.3); memberlist state.go probe()/resetNodes(). `on_wrap`
    filters the names kept for the next pass (reaping long-dead members).
    """

    __slots__ = ("_index", "_known", "_names", "_on_wrap")

    def __init__(self, on_wrap: Callable[[list[str]], list[str]]) -> None:
        self._names: list[str] = []
        self._known: set[str] = set()  # membership tests only, never iterated
        self._index = 0
        self._on_wrap = on_wrap

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._known

    @property
    def names(self) -> list[str]:
        return self._names

    def add(self, name: str, rng: random.Random) -> None:
        """Insert at a random position (memberlist aliveNode: swap with a random offset)."""
        if name in self._known:
            return
        self._known.add(name)
        self._names.append(name)
        j = rng.randrange(len(self._names))
        self._names[-1], self._names[j] = self._names[j], self._names[-1]

    def step(self, rng: random.Random) -> None:
        """Count a probe whose target the rota chose: the ring still wraps, and so
        reaps, once every len(ring) probes, as it does when `next` picks."""
        self._index += 1
        if self._index >= len(self._names):
            self._wrap(rng)

    def next(self, accept: Callable[[str], bool], rng: random.Random) -> str | None:
        """The next name `accept` takes, wrapping (and reshuffling) at most once per call."""
        for _ in range(2 * len(self._names) + 1):
            if self._index >= len(self._names):
                self._wrap(rng)
                if not self._names:
                    return None
            name = self._names[self._index]
            self._index += 1
            if accept(name):
                return name
        return None

    def _wrap(self, rng: random.Random) -> None:
        self._names = self._on_wrap(self._names)
        self._known = set(self._names)
        rng.shuffle(self._names)
        self._index = 0


def k_random_members(
    k: int,
    names: list[str],
    table: MemberTable,
    accept: Callable[[MemberInfo], bool],
    rng: random.Random,
) -> list[MemberInfo]:
    """Up to k distinct random members among `names` that `accept` takes.

    memberlist util.go kRandomNodes tries 3n random picks; that can miss in a
    small cluster, so up to EXACT_SAMPLE_MAX names we filter and sample exactly.
    """
    if len(names) <= EXACT_SAMPLE_MAX:
        pool = [m for n in names if (m := table.get(n)) is not None and accept(m)]
        return rng.sample(pool, min(k, len(pool)))
    chosen: dict[str, MemberInfo] = {}
    for _ in range(3 * len(names)):
        if len(chosen) >= k:
            break
        member = table.get(names[rng.randrange(len(names))])
        if member is not None and member.name not in chosen and accept(member):
            chosen[member.name] = member
    return list(chosen.values())


@dataclass(frozen=True, slots=True)
class Change:
    """What applying one message did: the member as now held, what to report, and
    whether to re-gossip the message (infection-style dissemination, SWIM §4.1)."""

    member: MemberInfo
    event: Event | None = None
    stat: str | None = None
    regossip: bool = True
    #: the member was suspect and this ends it: "refuted" (alive again) or "confirmed" (dead)
    ended_suspicion: str | None = None


class MemberStates:
    """Table + probe ring and rota + suspicion timers (memberlist state.go aliveNode,
    suspectNode, deadNode, resetNodes), changed only through the apply_* methods."""

    def __init__(self, config: GossipConfig, rng: random.Random, *, lifeguard: bool) -> None:
        self.config, self.lifeguard, self._rng = config, lifeguard, rng
        self.table = MemberTable()
        self.ring = ProbeRing(self._reap)
        self.rota = ProbeRota()  # the ALIVE and SUSPECT members, ourselves included
        self.suspicions: dict[str, Suspicion] = {}
        self._now = 0.0
        self._protected = ""  # ourselves: never reaped

    def add_self(self, member: MemberInfo) -> None:
        self._protected = member.name
        self.table.set(member)
        self.ring.add(member.name, self._rng)
        self.rota.set(member.name, True)

    def apply_alive(self, alive: Alive, now: float) -> Change | None:
        self._now = now
        held = self.table.get(alive.node)
        if held is None:
            member = MemberInfo(
                name=alive.node,
                addr=alive.addr,
                state=_A,
                incarnation=alive.incarnation,
                meta=alive.meta,
                state_since=now,
                lateness=alive.lateness_ms / 1000,
                lateness_at=now,
            )
            return self._store(Change(member, MemberJoined(member), "joins"))
        if alive.addr != held.addr:
            if not self._reclaimable(held, now):  # memberlist: "Conflicting address"
                return Change(held, None, "conflicts", regossip=False)
        elif not supersedes(held, _A, alive.incarnation) and not self._forgotten(held, now):
            return None
        member = MemberInfo(
            name=alive.node,
            addr=alive.addr,
            state=_A,
            incarnation=alive.incarnation,
            meta=alive.meta,
            state_since=held.state_since if held.state is _A else now,
            lateness=alive.lateness_ms / 1000,
            lateness_at=now,
        )
        if held.state is not _A:
            ended = "refuted" if held.state is _S else None
            return self._store(
                Change(member, MemberAlive(member), "rejoins", ended_suspicion=ended)
            )
        if (held.meta, held.addr) != (alive.meta, alive.addr):
            return self._store(Change(member, MemberUpdated(member)))
        return self._store(Change(member))

    def _forgotten(self, held: MemberInfo, now: float) -> bool:
        """Dead or gone past gossip_to_the_dead_time: memberlist has dropped it from its map.

        So news of it alive, even at the incarnation it died with, is a fresh
        join: that is how two sides of a healed partition, each holding the
        other dead, take each other back on the first push-pull between them.
        """
        return (held.state is _D or held.state is _L) and (
            now - held.state_since > self.config.gossip_to_the_dead_time
        )

    def _reclaimable(self, held: MemberInfo, now: float) -> bool:
        """May a node at another address take this name? (memberlist aliveNode)"""
        reclaim = self.config.dead_node_reclaim_time
        return held.state is _L or (
            held.state is _D and reclaim > 0 and now - held.state_since > reclaim
        )

    def apply_suspect(self, suspect: Suspect, now: float) -> Change | None:
        self._now = now
        held = self.table.get(suspect.node)
        if held is None:
            return None
        timer = self.suspicions.get(suspect.node)
        if timer is not None:
            if suspect.incarnation < held.incarnation:
                return None
            if suspect.incarnation > held.incarnation:  # keep the lattice's maximum
                held = replace(held, incarnation=suspect.incarnation)
                self.table.set(held)
            # Lifeguard: a Suspect from a new sender is an independent confirmation.
            return Change(held, None, "confirmations") if timer.confirm(suspect.sender) else None
        if not supersedes(held, _S, suspect.incarnation):
            return None
        self.suspicions[held.name] = Suspicion.begin(
            suspect.sender, self.config, len(self.ring), start=now, lifeguard=self.lifeguard
        )
        member = replace(held, state=_S, incarnation=suspect.incarnation, state_since=now)
        return self._store(Change(member, MemberSuspected(member, suspect.sender), "suspicions"))

    def apply_dead(self, dead: Dead, now: float) -> Change | None:
        self._now = now
        held = self.table.get(dead.node)
        state = _L if dead.sender == dead.node else _D
        if held is None or not supersedes(held, state, dead.incarnation):
            return None
        member = replace(held, state=state, incarnation=dead.incarnation, state_since=now)
        if state is _L:
            return self._store(Change(member, MemberLeft(member), "leaves"))
        ended = "confirmed" if held.state is _S else None
        return self._store(Change(member, MemberFailed(member), "failures", ended_suspicion=ended))

    def expired(self, now: float, accuser: str) -> list[Dead]:
        """Suspicions whose time ran out, as Dead verdicts from `accuser` (ourselves)."""
        verdicts = []
        for name, suspicion in list(self.suspicions.items()):
            if now >= suspicion.deadline:
                del self.suspicions[name]
                held = self.table.get(name)
                if held is not None and held.state is _S:
                    verdicts.append(Dead(incarnation=held.incarnation, node=name, sender=accuser))
        return verdicts

    def _store(self, change: Change) -> Change:
        member = change.member
        if member.state is not _S:
            self.suspicions.pop(member.name, None)
        self.table.set(member)
        live = member.state in (_A, _S)
        if live:
            self.ring.add(member.name, self._rng)
        self.rota.set(member.name, live)
        return change

    def _reap(self, names: list[str]) -> list[str]:
        """On each probe-ring wrap: drop members dead for gossip_to_the_dead_time from the
        ring (memberlist resetNodes) and forget those dead for tombstone_timeout."""
        cfg, now = self.config, self._now
        for member in list(self.table):
            if (
                member.state in _GONE
                and member.name != self._protected
                and now - member.state_since >= cfg.tombstone_timeout
            ):
                self.table.remove(member.name)
        return [
            name
            for name in names
            if (m := self.table.get(name)) is not None
            and not (m.state in _GONE and now - m.state_since >= cfg.gossip_to_the_dead_time)
        ]

    def tick(self, now: float) -> None:
        """Tell the table the time (the ring may wrap and reap during a probe)."""
        self._now = now
