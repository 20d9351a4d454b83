"""The `mesh` command-line client.

Every command except `mesh agent` talks to the local agent's HTTP API
(`--api`, `MESH_API`) with the standard library only, so that a short-lived
command does not pay for importing the agent's dependencies. One module per
noun (`network`, `service`, `task`, `members`) registers its commands; `spec`
parses the flag grammars (`--publish`, `--health-check`), `update` computes a
`service update`, `client` speaks HTTP and `table` lays out the output.
The entry point is `mesh.cli.entry:main`, which imports this package's commands only
for a command other than `mesh agent`.
"""
