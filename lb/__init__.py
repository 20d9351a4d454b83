"""Load balancing (the L4 and HRM issues fill this package).

L4: one backend interface (a desired table of virtual services to real
servers, applied as a diff) with three backends, `ipvs`, `nftables` and
`userspace`. L7: the HTTP routing mesh, a Host-header router.
"""
