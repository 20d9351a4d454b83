"""meshplane's agent: replicated state, HTTP API, health checks, CLI.

`mesh agent` composes the pieces (`mesh.agent`); the other packages (`gossip`,
`dns`, `lb`) are used by it and never import it.
"""

__version__ = "0.1.0"
