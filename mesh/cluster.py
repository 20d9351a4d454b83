"""The agent's side of gossip: its state as the core's delegate, joins, members, liveness.

- Every change this node makes (its own writes) goes out as a gossip User
  broadcast carrying the new record version; every record that arrives
  (broadcast or push-pull) is merged into the store last-writer-wins, then
  published and persisted like any change, so views follow remote writes the
  same way as local ones.
- Push-pull carries the whole state (tombstones included) as anti-entropy.
- When the core declares a node failed or left, `Liveness` hides its tasks
  from the views; when it is alive again they come back (`NodeWatch`, the
  shell's event sink, matches the core's events by type).
- `--join` targets (addresses, or DNS names: `mesh.seeds`) are tried in rounds with a
  bounded back-off until one answers (`mesh.retryjoin`).

Every part gets what it works with when it is made (`mesh.agent.build` makes
them in this order): `ClusterState` (the core's delegate), the core
(`Membership`), `NodeWatch`, the asyncio shell (`GossipShell`), then
`Cluster` and `ClusterKeyring`, which both drive the core through the shell.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import random
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from gossip.aio import GossipShell
from gossip.config import GossipConfig
from gossip.dissemination import USER_MIN_TRANSMITS
from gossip.errors import EncodeError
from gossip.keyring_store import LocalKeyringControl
from gossip.members import (
    Event,
    MemberAlive,
    MemberFailed,
    MemberJoined,
    MemberLeft,
    MemberSuspected,
    MemberUpdated,
)
from gossip.membership import Membership
from gossip.messages import Addr, MemberState
from gossip.security import KeyringError
from mesh.control import Control
from mesh.core import upkeep
from mesh.core.codec import record_from_dict, record_json
from mesh.core.feed import ChangeFeed
from mesh.core.logs import event
from mesh.core.model import Change, Record
from mesh.core.net import HostPort
from mesh.digest import (
    ANNOUNCE_INTERVAL,
    DIGEST_OP,
    REFRESH_INTERVAL,
    Digest,
    PeerDigests,
    digest_from,
)
from mesh.digest import decode as decode_digest
from mesh.liveness import Liveness
from mesh.retryjoin import RetryJoin, pick_seeds
from mesh.seeds import SeedResolver

log = logging.getLogger(__name__)

#: How often a join round looks whether a seed has answered, seconds.
JOIN_POLL = 0.1
#: How often one failed member is tried again (Swarm's NetworkDB: every second).
#: A push-pull across a healed partition brings the two sides back together.
RECONNECT_INTERVAL = 2.0
#: Peers a change too big for one datagram is pushed to over TCP.
OVERSIZED_FANOUT = 3
#: a delta above this is compressed (a UDP packet holds 1,400 bytes in all)
COMPRESS_ABOVE = 600


def encode_records(records: Sequence[Record]) -> bytes:
    # The same bytes as the list's compact JSON, from each record's shared text.
    raw = ("[" + ",".join(record_json(r) for r in records) + "]").encode()
    if len(raw) > COMPRESS_ABOVE:
        return b"z" + zlib.compress(raw, 6)
    return b"j" + raw


def decode_records(data: bytes, limit: int = 64 << 20) -> list[Record]:
    """Records from a peer; raises ValueError on anything malformed."""
    if data[:1] == b"z":
        inflater = zlib.decompressobj()
        raw = inflater.decompress(data[1:], limit)
        if inflater.unconsumed_tail:
            raise ValueError("state too large")
    elif data[:1] == b"j":
        raw = data[1:]
    else:
        raise ValueError("unknown state encoding")
    items = json.loads(raw)
    if not isinstance(items, list):
        raise ValueError("state is not a list")
    return [record_from_dict(item) for item in items]


#: First byte of a User payload: which layer above gossip it is for.
KEYRING_OP = b"k"


class ClusterKeyring:
    """`mesh keyring install|use|remove` for the whole cluster (Serf's `keys`).

    The change is applied here first (and saved), then gossiped as a User
    message, which travels sealed with the current primary key, so only
    members that already hold a key of the ring can read or send one. Every
    member applies it in turn. Each change is idempotent, so the epidemic's
    repeats do no harm; rotate as Serf does: install everywhere, use, remove.
    """

    def __init__(self, local: LocalKeyringControl, core: Membership, shell: GossipShell) -> None:
        self.local = local
        self._core = core
        self._shell = shell

    def list(self) -> dict[str, Any]:
        return self.local.list()

    async def install(self, key: bytes) -> None:
        await self._do("install", key)

    async def use(self, key: bytes) -> None:
        await self._do("use", key)

    async def remove(self, key: bytes) -> None:
        await self._do("remove", key)

    async def _do(self, op: str, key: bytes) -> None:
        await getattr(self.local, op)(key)
        # A fresh nonce in the payload: the same op made twice is gossiped twice
        # (the core delivers each distinct payload once).
        nonce = os.urandom(8).hex()
        payload = json.dumps({"op": op, "key": base64.b64encode(key).decode(), "nonce": nonce})
        self._core.broadcast(KEYRING_OP + payload.encode(), key=f"keyring/{nonce}")
        self._shell.flush()


class RemoteKeyring:
    """Applies the keyring changes other members gossip (see `ClusterKeyring`)."""

    def __init__(self, local: LocalKeyringControl) -> None:
        self.local = local
        self.applied = 0
        self.failed = 0

    async def apply_remote(self, payload: bytes) -> None:
        try:
            body = json.loads(payload)
            op, key = body["op"], base64.b64decode(body["key"], validate=True)
            if op not in ("install", "use", "remove"):
                raise ValueError(op)
            await getattr(self.local, op)(key)
            self.applied += 1
            event(log, "keyring_changed", op=op, via="gossip")
        except (ValueError, KeyError, TypeError, binascii.Error, KeyringError, OSError) as exc:
            self.failed += 1
            event(log, "keyring_change_failed", logging.WARNING, error=repr(exc))


class ClusterState:
    """The core's StateDelegate: the replicated tables of this node."""

    def __init__(self, control: Control, keyring: RemoteKeyring | None = None) -> None:
        self._control = control
        self._keyring = keyring
        self._pending: set[asyncio.Task[None]] = set()
        self.peer_digests = PeerDigests()
        self.merged = 0
        self.rejected = 0

    def local_state(self, join: bool) -> bytes:
        return encode_records(list(self._control.store.all_records()))

    def merge_remote_state(self, data: bytes, join: bool) -> None:
        self._merge(data, "push_pull")

    def notify_user(self, payload: bytes, source: str) -> None:
        if payload.startswith(KEYRING_OP):
            if self._keyring is None:
                self.rejected += 1
                return
            task = asyncio.get_running_loop().create_task(
                self._keyring.apply_remote(payload[len(KEYRING_OP) :])
            )
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
            return
        if payload.startswith(DIGEST_OP):
            try:
                node, digest, sent_at = decode_digest(payload)
            except (ValueError, UnicodeDecodeError):
                self.rejected += 1
                return
            self.peer_digests.record(node, digest, sent_at, asyncio.get_running_loop().time())
            return
        self._merge(payload, "broadcast")

    def _merge(self, data: bytes, via: str) -> None:
        try:
            records = decode_records(data)
        except (ValueError, KeyError, TypeError, zlib.error) as exc:
            self.rejected += 1
            event(log, "gossip_state_rejected", logging.WARNING, via=via, error=repr(exc))
            return
        store = self._control.store
        changes = self._control.apply_sync(
            lambda _now: [c for r in records for c in store.merge(r)]
        )
        self.merged += len(changes)


def gossip_core(
    config: GossipConfig,
    name: str,
    advertise: Addr,
    state: ClusterState,
    *,
    incarnation: int = 0,
    rng: random.Random | None = None,
) -> Membership:
    """The sans-IO gossip core of this node, on the running loop's clock."""
    loop = asyncio.get_running_loop()
    # The probe rota's periods are slots of Unix time, which the nodes share (NTP);
    # the core's own clock stays the loop's monotonic one.
    return Membership(
        config,
        name,
        advertise,
        rng=rng or random.Random(),
        now=loop.time(),
        state=state,
        incarnation=incarnation,
        wall_offset=time.time() - loop.time(),
        user_min_transmits=_min_transmits,
    )


def _min_transmits(payload: bytes) -> int:
    """State records and keyring operations are sent at least USER_MIN_TRANSMITS times by
    each holder; a digest announcement, repeated every 10 s and read only by `mesh
    doctor`, keeps memberlist's limit (at 8 it doubled an idle cluster's gossip)."""
    return 0 if payload.startswith(DIGEST_OP) else USER_MIN_TRANSMITS


class SuspectSink(Protocol):
    """Who acts on suspicions before the verdict: the L4 driver (lb/failover.py)."""

    def node_suspected(self, node: str) -> None: ...

    def node_cleared(self, node: str, *, refuted: bool) -> None: ...


class NodeWatch:
    """The gossip shell's event sink: a node down hides its tasks from the views, a
    node back shows them again (`Liveness`), published on the feed as shown. A
    suspected node is told to `suspects` (the L4 driver), and so is the suspicion's
    end: refuted (alive, or back), or a verdict (after the views have hidden it)."""

    def __init__(
        self, liveness: Liveness, feed: ChangeFeed, suspects: SuspectSink | None = None
    ) -> None:
        self._liveness = liveness
        self._feed = feed
        self._suspects = suspects

    def on_event(self, member_event: Event) -> None:
        match member_event:
            case MemberFailed(member=member) | MemberLeft(member=member):
                why = "left" if isinstance(member_event, MemberLeft) else "dead"
                changes = self._liveness.node_down(member.name, why)
                self._feed.publish(changes, shown=True)
                event(
                    log,
                    "node_down",
                    logging.WARNING,
                    node=member.name,
                    why=type(member_event).__name__,
                    tasks_hidden=len(changes),
                )
                if self._suspects is not None:
                    self._suspects.node_cleared(member.name, refuted=False)
            case MemberJoined(member=member) | MemberAlive(member=member):
                changes = self._liveness.node_up(member.name)
                self._feed.publish(changes, shown=True)
                event(
                    log,
                    "node_up",
                    node=member.name,
                    why=type(member_event).__name__,
                    tasks_shown=len(changes),
                )
                if self._suspects is not None:
                    self._suspects.node_cleared(member.name, refuted=True)
            case MemberSuspected(member=member, by=by):
                event(log, "node_suspected", node=member.name, by=by)
                if self._suspects is not None:
                    self._suspects.node_suspected(member.name)
            case MemberUpdated():
                pass


class Cluster:
    """This node in the cluster: gossips its own writes, joins, reconnects, tells its
    state digest, and answers `GET /v1/members`, `/v1/gossip`. A view of the feed."""

    def __init__(
        self,
        control: Control,
        core: Membership,
        shell: GossipShell,
        state: ClusterState,
        liveness: Liveness,
        name: str,
    ) -> None:
        self._control = control
        self.core = core
        self.shell = shell
        self.state = state
        self.liveness = liveness
        self.name = name
        self._join_task: asyncio.Task[None] | None = None
        self._reconnect_task: asyncio.Task[None] | None = None
        self._digest_task: asyncio.Task[None] | None = None
        self._digest: tuple[int, Digest] | None = None  # (feed seq, digest then)
        self._rng = random.Random()
        self.reconnects = 0
        self.oversized = 0
        #: join rounds in which no other member answered (`GET /v1/gossip`)
        self.join_rounds_failed = 0
        self._seed_resolver: SeedResolver | None = None

    # -- the feed --------------------------------------------------------------------

    def load(self, records: Iterable[Record]) -> None:
        """Nothing to gossip: the state as it is reaches peers by push-pull."""

    def on_change(self, change: Change) -> None:
        """Gossip this node's own writes (merged ones were gossiped by their writer)."""
        record = change.after
        if record.version.node != self.name:
            return
        try:
            self.core.broadcast(encode_records([record]), key=f"{change.kind.value}/{change.key}")
        except EncodeError:
            # Too big for a datagram: push-pull (TCP) with a few peers instead; gossip
            # spreads it from there only at their next push-pulls, so reach several.
            self.oversized += 1
            peers = [
                m.addr
                for m in self.core.members()
                if m.name != self.name and m.state is MemberState.ALIVE
            ]
            self._rng.shuffle(peers)
            if peers:
                self.core.join(peers[:OVERSIZED_FANOUT], self.shell.now())
        self.shell.flush()

    async def join(
        self,
        targets: Sequence[HostPort],
        resolver: SeedResolver | None = None,
        *,
        max_rounds: int = 0,
        on_give_up: Callable[[str], None] | None = None,
    ) -> None:
        """Join through the targets (addresses, or names the resolver turns into seeds)
        in rounds until some other member answers, backing off (`mesh.retryjoin`)."""
        # the periodic jobs (these two, and the DNS and HTTP sweeps) ride gossip's wake-ups
        self.shell.on_wake = upkeep.upkeep().nudge
        self._reconnect_task = asyncio.create_task(self._reconnect_failed())
        self._digest_task = asyncio.create_task(self._announce_digest())
        if not targets:
            return
        plan = RetryJoin(tuple(targets), max_rounds=max_rounds, rng=self._rng)
        self._seed_resolver = resolver or SeedResolver()
        self._join_task = asyncio.create_task(self._keep_joining(plan, on_give_up))

    async def _reconnect_failed(self) -> None:
        """Now and then push-pull with one failed member: it may only have been cut off."""
        while True:
            await upkeep.sleep(RECONNECT_INTERVAL)
            failed = sorted(m.addr for m in self.core.members() if m.state is MemberState.DEAD)
            if failed:
                self.core.join([self._rng.choice(failed)], asyncio.get_running_loop().time())
                self.shell.flush()
                self.reconnects += 1

    async def _announce_digest(self) -> None:
        """Tell the cluster this node's state digest when it changed (and now and then)."""
        last = ""
        last_sent = 0.0
        loop = asyncio.get_running_loop()
        while True:
            await upkeep.sleep(ANNOUNCE_INTERVAL)
            digest = self._state_digest()
            if digest.value == last and loop.time() - last_sent < REFRESH_INTERVAL:
                continue
            self.core.broadcast(digest.encode(self.name, time.time()), key="digest")
            self.shell.flush()
            last, last_sent = digest.value, loop.time()

    def _state_digest(self) -> Digest:
        """The digest of the store, made again only after the change feed moved.

        Every write the store takes (API, gossip merge, health) is published on
        the feed, so an unchanged sequence number means unchanged records; and the
        store keeps the digest's XOR up to date with each write, so a changed state
        is not rehashed record by record either (10,000 tasks: one hash per write).
        """
        seq = self._control.feed.seq
        if self._digest is None or self._digest[0] != seq:
            self._digest = (seq, digest_from(self._control.store.digest_terms()))
        return self._digest[1]

    def digests(self) -> dict[str, Any]:
        """This node's digest now, and the latest each peer announced (for `mesh doctor`)."""
        digest = self._state_digest()
        now = asyncio.get_running_loop().time()
        alive = {m.name for m in self.core.members() if m.state is MemberState.ALIVE}
        return {
            "digest": digest.value,
            "records": digest.records,
            "peers": [p for p in self.state.peer_digests.view(now) if p["node"] in alive],
        }

    async def _keep_joining(
        self, plan: RetryJoin, on_give_up: Callable[[str], None] | None
    ) -> None:
        loop = asyncio.get_running_loop()
        assert self._seed_resolver is not None
        delay = plan.backoff.first
        while True:
            plan.begin_round(loop.time())
            resolved = await self._seed_resolver.resolve_all(plan.names())
            seeds = pick_seeds(plan.literal_seeds() + resolved.seeds, self._rng)
            self.core.join(seeds, loop.time())
            self.shell.flush()
            # A push-pull answers in milliseconds: look often, wait at most the back-off.
            deadline = loop.time() + delay
            while loop.time() < deadline:
                await asyncio.sleep(min(JOIN_POLL, max(deadline - loop.time(), 0.0)))
                if self._has_peer():
                    event(
                        log,
                        "cluster_joined",
                        members=len(self.core.members()),
                        rounds=plan.failed + 1,
                        seconds=round(plan.joined(loop.time()), 3),
                    )
                    return
            failed = plan.round_failed(loop.time())
            self.join_rounds_failed += 1
            # One line per failed round, whatever the number of seeds or names in it.
            event(
                log,
                "join_retry",
                logging.WARNING,
                round=failed.round,
                seeds=",".join(f"{h}:{p}" for h, p in seeds) or "none",
                unresolved=",".join(f"{n}({why})" for n, why in resolved.failures.items())
                or "none",
                next_in=round(failed.delay, 2),
            )
            if failed.give_up:
                reason = (
                    f"no node of --join answered in {failed.round} rounds "
                    f"({failed.elapsed:.0f} s): giving up (--retry-join-max {plan.max_rounds})"
                )
                event(log, "join_gave_up", logging.ERROR, rounds=failed.round)
                if on_give_up is not None:
                    on_give_up(reason)
                return
            delay = failed.delay

    def _has_peer(self) -> bool:
        return any(
            m.name != self.name and m.state is MemberState.ALIVE for m in self.core.members()
        )

    async def leave(self) -> None:
        for task in (self._join_task, self._reconnect_task, self._digest_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._seed_resolver is not None:
            await self._seed_resolver.close()
        self.core.leave(self.shell.now())
        self.shell.flush()
        await asyncio.sleep(0.2)  # let the leave go out before the socket closes

    def stats(self) -> dict[str, Any]:
        shell = self.shell
        me = next((m for m in self.core.members() if m.name == self.name), None)
        return {
            "node": self.name,
            "incarnation": 0 if me is None else me.incarnation,
            "health_score": self.core.health_score(),
            "members": len(self.core.members()),
            "lateness": round(self.core.lateness(asyncio.get_running_loop().time()), 3),
            "encrypted": shell.keyring is not None,
            "verify_incoming": shell.verify_incoming,
            "verify_outgoing": shell.verify_outgoing,
            "drops": dict(shell.drops),
            "messages": {"in": dict(shell.messages_in), "out": dict(shell.messages_out)},
            "bytes": {"in": shell.bytes_in, "out": shell.bytes_out},
            "stream_bytes": {"in": shell.stream_bytes_in, "out": shell.stream_bytes_out},
            "probe_rtt": self.core.probe_rtt().snapshot(),
            "counts": {
                **dict(shell.counts),
                **{k: int(v) for k, v in self.core.stats.items()},
                "state_merged": self.state.merged,
                "state_rejected": self.state.rejected,
                "reconnects": self.reconnects,
                "oversized_deltas": self.oversized,
                "join_rounds_failed": self.join_rounds_failed,
            },
            "state": self.digests(),
        }

    def node_statuses(self) -> dict[str, str]:
        """Every node gossip knows of -> alive, suspect, dead or left, as this node sees it.

        A node gossip has forgotten (long dead) keeps the status it went down with.
        """
        statuses = {m.name: m.state.name.lower() for m in self.core.members()}
        for node in self.liveness.down:
            statuses.setdefault(node, self.liveness.why.get(node, "dead"))
        statuses[self.name] = "alive"
        return statuses

    def members(self) -> list[dict[str, Any]]:
        now = asyncio.get_running_loop().time()
        suspicions = self.core.suspicions(now)
        late = self.core.late_members(now)
        out = []
        for m in sorted(self.core.members(), key=lambda m: m.name):
            member: dict[str, Any] = {
                "name": m.name,
                "address": m.addr[0],
                "port": m.addr[1],
                "status": m.state.name.lower(),
                "incarnation": m.incarnation,
            }
            if m.name in suspicions:
                left, confirmations = suspicions[m.name]
                member["suspicion"] = {"dead_in": round(left, 3), "confirmations": confirmations}
            if m.name in late:
                member["late_by"] = round(late[m.name], 3)
            out.append(member)
        return out
