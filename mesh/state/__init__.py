"""The node's own state machinery: the store (sans-IO mutations of the records in
`mesh.core.model`), its specs, durability in the data dir and the data dir's lock."""
