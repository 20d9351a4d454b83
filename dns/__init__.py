"""The embedded DNS server.

It answers `service`, `tasks.service`, task names, `name.network`, SRV and PTR
(at 127.0.0.11:53 as root) from per-network views of the replicated state, and
forwards every other name to the host's upstream resolvers. The sans-IO parts
(`table`: the names, following the change feed; `responder`: a query's bytes
in, a reply's bytes out, with its `cache`; `question`, `wire`, `tcpslots`) are
driven by a thin asyncio shell (`server`, `service`), optionally in more
processes on the same port (`worker`); `forward` talks to the upstreams, and
`lookup` serves `mesh resolve`. It stands on `mesh.core` only.
"""
