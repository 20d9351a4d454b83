"""meshplane's agent, and the ground every other package stands on.

`mesh.core` is the ground layer (the state model, the change feed, logging,
worker plumbing). `gossip`, `dns` and `lb` stand on it and on nothing else of
`mesh`; the rest of `mesh` (the store, the API, the CLI, health checks, the
cluster glue) is the agent on top, and `mesh.agent` composes it all.
docs/architecture.md draws the layers; pyproject.toml's import-linter
contracts enforce them.
"""

__version__ = "0.1.0"
