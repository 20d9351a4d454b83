"""Load balancing: L4 for the VIPs and published ports, L7 for HTTP by Host header.

L4 (docs/lb.md): one desired table of virtual services to real servers
(`table`), kept in step with the state by a sans-IO view (`view`), applied as
a diff by one of three backends behind one interface (`backend`): `ipvs`,
`nftables` (`nft`) or `userspace`, chosen by `--lb` (`select`); `driver` is
the agent's side. L7: the HTTP routing mesh (`http`, docs/hrm.md). It stands
on `mesh.core` only.
"""
