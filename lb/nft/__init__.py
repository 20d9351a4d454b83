"""The `nftables` L4 backend: the kernel path where the kernel has no ip_vs.

One table of its own (`table ip meshplane` by default) holds everything; nothing
outside it is touched. `lb/nft/base.py` describes the hooked chains (DNAT and
the masquerade rule), `lb/nft/layout.py` the per-service objects and how an op
becomes a handful of element changes (weights as map slots: `lb/nft/slots.py`
reduces them by their gcd, caps the ring at 16,384 slots and spreads each real's
slots evenly), `lb/nft/listing.py` how `read()` and `start()` read the kernel's table
back, `lb/nft/conntrack.py` how the flows of removed reals are flushed.

How it talks to the kernel: the `nft` tool, one `nft -f -` transaction per
`apply` (atomic: a batch is applied whole or not at all), written in nft's
text syntax; reads use `nft -j list table` (JSON). Why not pyroute2's
nftables support: it is a thin netlink layer without the expression builder a
`numgen ... map` DNAT rule needs, so we would be hand-encoding netlink
expressions that `nft` already compiles and the kernel's own tests exercise.
Why not JSON for the writes: the nft of Debian 12 (1.0.6, this machine's and
CI's) cannot express this ruleset in JSON — a map with a concatenated
`ipv4_addr . inet_service` value makes its JSON parser crash (SIGSEGV), and a
map keyed by `numgen` needs `typeof`, which its JSON parser does not know.
The text syntax has both; every value we write is validated first (IPv4
addresses, ports, protocols, our own object names), so no quoting is needed.

Kernel settings: `net.ipv4.ip_forward=1` (DNAT to a real on another host is
forwarding); it is left on at close, as other users of the host may rely on it.
`net.ipv4.conf.all.route_localnet=1` only with `localhost=True` (the default):
it is what lets 127.0.0.1:<published> on the node reach a real elsewhere, as
Swarm's routing mesh allows. It comes with a guard chain against what it opens
(packets from outside addressed to 127.0.0.0/8; see `lb/nft/base.py`), and the
value found before the first start is put back at close.

What nftables cannot do that IPVS can: least-connections (no per-real count a
rule can read) — `lc` is refused with a `BackendError` that says so (it used to
run round robin with one log line: silence, as far as the operator could tell).
Connection tracking keeps idle TCP flows for
`nf_conntrack_tcp_timeout_established` (5 days by default), not IPVS's 900 s.
IPv4 only, like Swarm's VIPs and ingress. `close()` removes the table; flows
already established keep their conntrack NAT binding until they end.
"""

from lb.nft.backend import NftablesBackend

__all__ = ["NftablesBackend"]
