"""The replicated state of a node: records, the store, the change feed, persistence."""
