"""The ground layer: what every package of the agent stands on.

The state model and its change feed (`model`, `feed`, `codec`), the feed's
client for worker processes (`feedclient`), logging (`logs`) and worker-process
plumbing (`workers`). It imports nothing of `gossip`, `dns`, `lb` or the rest of
`mesh`; those all import it. The contracts in pyproject.toml (import-linter)
hold that line.
"""
