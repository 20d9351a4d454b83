"""The HTTP API of the agent (aiohttp), `make_app` in `mesh.api.app`."""
