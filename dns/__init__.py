"""The embedded DNS server (the DNS issue fills this package).

It will answer `service`, `tasks.service`, task names, SRV and PTR at
127.0.0.11 from per-network views of the replicated state, and forward every
other name to the host's upstream resolvers.
"""
