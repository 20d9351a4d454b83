"""Cluster membership and replication (the gossip issue fills this package).

It will hold SWIM membership with the Lifeguard refinements, piggybacked
dissemination, TCP push-pull anti-entropy and keyring encryption: a sans-IO
core fed packets and an injected clock, one asyncio UDP/TCP transport on port
7946, and a deterministic simulator that drives the same core.
"""
