"""When to program an encrypted overlay's IPsec and filter again (sans-IO).

What a node's kernel must hold for its encrypted overlays is a function of four
things, none of which calls back when it changes:

- the VNIs of the encrypted overlay networks this node serves (the filter,
  `mesh.sandbox.espfilter`, marks and guards exactly those);
- the VTEPs of the other alive nodes (`PeerTable.vteps()`: `Node` records that
  `Liveness` shows; a dead node's go with it). Every node serves every overlay,
  so every alive node is a peer of every encrypted one;
- the cluster keyring (gossip's; changed in place by `mesh keyring` here or by
  a change gossiped from another node);
- the data-path port.

`EspWant` is that value; the shell computes it on every change of the records
and on a 1 s tick (the keyring's only trigger), and `EspSchedule` says whether
a sync is due: the want differs from what the last successful sync made, no
sync is queued, and a failed sync of this same want is not retried before
`retry` seconds (a kernel without ESP would otherwise spawn `ip` every tick).
No encrypted overlay left: the want is `EspWant.NONE`, whose sync removes our
SAs, policies and table.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from mesh.sandbox import esp

#: seconds before a failed sync of an unchanged want is tried again
RETRY = 5.0


@dataclass(frozen=True, slots=True)
class EspWant:
    """Everything a sync programs; equal wants need no sync."""

    vnis: frozenset[int] = frozenset()
    remotes: frozenset[str] = frozenset()
    #: the keyring, primary first; () when the agent has none
    keys: tuple[bytes, ...] = field(default=(), repr=False)
    port: int = esp.DEFAULT_PORT

    @property
    def active(self) -> bool:
        return bool(self.vnis)


NONE = EspWant()


def want(
    overlays: Iterable[tuple[int, Mapping[str, str]]],
    vteps: Iterable[str],
    keyring: Iterable[bytes] | None,
    port: int,
) -> EspWant:
    """The want from the served overlays' (VNI, options), the other nodes' VTEPs and
    the keyring (None: this agent has none). Nothing encrypted: `NONE`, whatever the
    rest. An overlay whose `encrypted` option cannot be read counts as encrypted
    (the store refuses such a value; a record from elsewhere must not fail open)."""
    vnis = set()
    for vni, options in overlays:
        try:
            encrypted = esp.is_encrypted(options)
        except esp.EspError:
            encrypted = True
        if encrypted and vni:
            vnis.add(vni)
    if not vnis:
        return NONE
    keys = () if keyring is None else tuple(bytes(key) for key in keyring)
    return EspWant(frozenset(vnis), frozenset(vteps), keys, port)


class EspSchedule:
    """Which want the kernel holds, and whether a sync is due (see the module)."""

    def __init__(self, retry: float = RETRY) -> None:
        self.retry = retry
        #: what the kernel holds after the last successful sync (NONE at start: a
        #: restarted agent's leftovers are for the first sync to remove, see `due`)
        self.synced: EspWant | None = None
        self.queued = False
        self._failed: tuple[EspWant, float] | None = None
        self.last_error: str | None = None

    def due(self, wanted: EspWant, now: float) -> bool:
        """Whether to queue a sync of `wanted` now. At start nothing is known of the
        kernel, so the first want (NONE too: an earlier run's leftovers) is synced."""
        if self.queued or wanted == self.synced:
            return False
        if self._failed is not None:
            failed_want, at = self._failed
            if failed_want == wanted and now - at < self.retry:
                return False
        return True

    def started(self) -> None:
        self.queued = True

    def succeeded(self, wanted: EspWant) -> None:
        self.queued = False
        self.synced = wanted
        self._failed = None
        self.last_error = None

    def failed(self, wanted: EspWant, error: str, now: float) -> bool:
        """Record a failed sync; True when its reason is new (worth a log line)."""
        self.queued = False
        self.synced = None  # the kernel may hold part of it: sync again
        self._failed = (wanted, now)
        new = error != self.last_error
        self.last_error = error
        return new
