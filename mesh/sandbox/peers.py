"""The overlay peer table: which remote endpoints each overlay network must reach (sans-IO).

Swarm keeps an "overlay peer table" in its NetworkDB; here it is derived, never
stored: from the replicated records this node's change feed shows,

- every task's sandbox endpoint on an overlay network (its address and MAC, on
  the node that runs the task),
- every node's own address on each overlay (`Node.addresses`: the address the
  routing mesh and the HRM reach that node's bridge by), and
- every node's VTEP (`Node.vtep`, its `--advertise` address): where the VXLAN
  packets for that node's endpoints go.

A node that is down is hidden by `Liveness` (its tasks and its `Node` record
read as removed), so its entries leave the table the moment gossip declares it
dead. The endpoints of this node itself are not peers: they sit on its own
bridge. Two holders of one address (two nodes handed it out at one moment,
until the store repairs it) give one entry: the one the repair keeps (a task
before a node address, the older task, the smaller node name), so the kernel
never holds two neighbour entries for one address.

`PeerTable.update` takes one record and answers the overlay networks whose
peers may have changed; `peers(network)` is then the whole set to program
(`OverlayDriver.set_peers` makes the kernel's entries exactly that).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from mesh.core.model import Network, Node, Record, Task
from mesh.sandbox.names import mac_of

#: The owner of an address on a network: ("task", id) or ("node", name).
Owner = tuple[str, str]


@dataclass(frozen=True, slots=True, order=True)
class PeerEntry:
    """One remote endpoint as the overlay driver programs it (its `Peer`)."""

    mac: str
    address: str
    vtep: str


@dataclass(frozen=True, slots=True)
class _Holder:
    #: which holder keeps an address two claim: the smaller (the store's repair rule)
    rank: tuple[int, float, str]
    node: str  # the node that has it
    address: str
    mac: str


class PeerTable:
    """This node's view of every overlay's endpoints, kept in step with the records."""

    def __init__(self, node: str) -> None:
        self.node = node
        #: live overlay networks -> their subnet
        self._overlays: dict[str, ipaddress.IPv4Network] = {}
        self._vteps: dict[str, str] = {}
        self._holders: dict[str, dict[Owner, _Holder]] = {}
        self._networks_of: dict[Owner, set[str]] = {}

    def load(self, records: list[Record]) -> None:
        for record in records:
            self.update(record)

    def overlays(self) -> frozenset[str]:
        return frozenset(self._overlays)

    def vteps(self) -> frozenset[str]:
        """The VTEPs of the other nodes that serve overlays and are alive (the peers
        of an encrypted overlay's IPsec)."""
        return frozenset(vtep for node, vtep in self._vteps.items() if node != self.node)

    def update(self, record: Record) -> frozenset[str]:
        """Take one record (removed or hidden ones included); the overlays it touched."""
        match record:
            case Network():
                if record.deleted or record.driver != "overlay":
                    if record.name not in self._overlays:
                        return frozenset()
                    del self._overlays[record.name]
                else:
                    self._overlays[record.name] = ipaddress.IPv4Network(record.subnet)
                return frozenset({record.name})
            case Task():
                held: list[tuple[str, _Holder]] = []
                if not record.deleted and record.sandbox is not None:
                    rank = (0, record.created_at, record.id)
                    held = [
                        (e.network, _Holder(rank, record.node, e.address, e.mac))
                        for e in record.sandbox.endpoints
                    ]
                return self._replace(("task", record.id), held)
            case Node():
                owner = ("node", record.name)
                before = self._vteps.get(record.name)
                if record.deleted or not record.vtep:
                    self._vteps.pop(record.name, None)
                    pairs: list[tuple[str, _Holder]] = []
                else:
                    self._vteps[record.name] = record.vtep
                    rank = (1, 0.0, record.name)
                    pairs = [
                        (net, _Holder(rank, record.name, address, mac_of(address)))
                        for net, address in record.addresses.items()
                    ]
                touched = self._replace(owner, pairs)
                if before != self._vteps.get(record.name):
                    # every endpoint of that node moves to (or from) another VTEP
                    return frozenset(self._overlays)
                return touched
        return frozenset()

    def _replace(self, owner: Owner, pairs: list[tuple[str, _Holder]]) -> frozenset[str]:
        old = self._networks_of.pop(owner, set())
        for net in old:
            holders = self._holders.get(net)
            if holders is not None:
                holders.pop(owner, None)
                if not holders:
                    del self._holders[net]
        new = set()
        for net, holder in pairs:
            self._holders.setdefault(net, {})[owner] = holder
            new.add(net)
        if new:
            self._networks_of[owner] = new
        return frozenset((old | new) & self._overlays.keys())

    def peers(self, network: str) -> frozenset[PeerEntry]:
        """Every remote endpoint of `network` whose node has a known VTEP."""
        subnet = self._overlays.get(network)
        if subnet is None:
            return frozenset()
        # One holder per address and per MAC, the one the repair keeps; an address
        # outside the subnet (a record of a network of the same name, gone) is none.
        holders = sorted(self._holders.get(network, {}).values(), key=lambda h: h.rank)
        kept: list[_Holder] = []
        addresses: set[str] = set()
        macs: set[str] = set()
        for holder in holders:
            if holder.address in addresses or holder.mac.lower() in macs:
                continue
            if not _inside(holder.address, subnet):
                continue
            addresses.add(holder.address)
            macs.add(holder.mac.lower())
            kept.append(holder)
        entries = set()
        for holder in kept:
            if holder.node == self.node:
                continue  # on this node's own bridge
            vtep = self._vteps.get(holder.node)
            if vtep is None:
                continue  # down, or serves no overlay: nowhere to send its frames
            entries.add(PeerEntry(holder.mac, holder.address, vtep))
        return frozenset(entries)

    def table(self) -> dict[str, frozenset[PeerEntry]]:
        """The whole table: every overlay network -> its peers."""
        return {network: self.peers(network) for network in sorted(self._overlays)}


def _inside(address: str, subnet: ipaddress.IPv4Network) -> bool:
    try:
        return ipaddress.IPv4Address(address) in subnet
    except ValueError:
        return False
