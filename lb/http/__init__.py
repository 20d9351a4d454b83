"""The HTTP routing mesh: an L7 router by Host header, its route table and its workers."""
