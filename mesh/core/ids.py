"""An index from a key to the ids under it, for keys that mostly hold one id.

A set of one id costs ~200 bytes; most keys of the indexes that use this (a task's
address in the DNS table, a task's endpoint in the store) hold exactly one task, so the
id is kept as itself and becomes a set only when a second one joins: at 10,000 tasks
that is ~2 MB less per index, in the agent and again in each worker holding a copy.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class IdIndex(Generic[K]):
    """key -> the ids under it; a key whose last id goes is removed (an emptied set
    would stay behind)."""

    __slots__ = ("_by_key",)

    def __init__(self) -> None:
        self._by_key: dict[K, str | set[str]] = {}

    def add(self, key: K, id_: str) -> None:
        held = self._by_key.get(key)
        if held is None or held == id_:
            self._by_key[key] = id_
        elif isinstance(held, str):
            self._by_key[key] = {held, id_}
        else:
            held.add(id_)

    def discard(self, key: K, id_: str) -> None:
        held = self._by_key.get(key)
        if held is None:
            return
        if isinstance(held, str):
            if held == id_:
                del self._by_key[key]
            return
        held.discard(id_)
        if len(held) == 1:
            self._by_key[key] = next(iter(held))
        elif not held:
            del self._by_key[key]

    def get(self, key: K) -> Collection[str]:
        held = self._by_key.get(key)
        if held is None:
            return ()
        return (held,) if isinstance(held, str) else held

    def __len__(self) -> int:
        return len(self._by_key)
