"""The keyring file (`mesh agent --keyring FILE`) and a node-local keyring control.

The file is JSON, `{"keys": [base64, ...], "primary": base64}`, written
atomically (a private temporary file, fsync, rename, fsync of the directory)
with mode 0600, so that a crash leaves the old keyring or the new one, never
half of one, and no other user can read a key.

To make a first keyring by hand, `load_keyring` also reads the two simpler forms an
operator is likely to write: a JSON array of base64 keys, the primary first
(Serf's keyring file), and a file holding one bare key (`mesh keygen > FILE`).
The next change rewrites it in the full form.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gossip.security import Keyring, KeyringError, encode_key, keyring_view, parse_key


def load_keyring(path: Path) -> Keyring:
    """The keyring stored at `path`; `KeyringError` (code `bad_file`) if it is unusable."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyringError(f"cannot read keyring file {path}: {_why(exc)}", "bad_file") from None
    try:
        return decode(text)
    except KeyringError as exc:
        raise KeyringError(f"keyring file {path}: {exc}", "bad_file") from None


def decode(text: str) -> Keyring:
    stripped = text.strip()
    if not stripped.startswith(("{", "[")):
        return Keyring([parse_key(stripped)])
    try:
        document = json.loads(stripped)
    except ValueError as exc:
        raise KeyringError(f"not valid JSON: {exc}", "bad_file") from None
    if isinstance(document, list):
        return Keyring(_keys(document))
    if isinstance(document, dict):
        return _from_object(document)
    raise KeyringError("expected a JSON object or array", "bad_file")


def _from_object(document: dict[str, Any]) -> Keyring:
    keys = _keys(document.get("keys"))
    primary = document.get("primary")
    if primary is None:  # the first key is the primary, as in the array form
        return Keyring(keys)
    if not isinstance(primary, str):
        raise KeyringError('"primary" must be a base64 string', "bad_file")
    first = parse_key(primary)
    if first not in keys:
        raise KeyringError('"primary" is not one of "keys"', "bad_file")
    return Keyring([first, *keys])


def _keys(value: Any) -> list[bytes]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise KeyringError('"keys" must be an array of base64 strings', "bad_file")
    return [parse_key(item) for item in value]


def encode(keyring: Keyring) -> str:
    keys = [encode_key(key) for key in keyring]
    return json.dumps({"keys": keys, "primary": keys[0]}, indent=2) + "\n"


def save_keyring(path: Path, keyring: Keyring) -> None:
    """Replace the file at `path` with `keyring`, atomically, readable by its owner only."""
    write_private(path, encode(keyring).encode("utf-8"))


def write_private(path: Path, data: bytes) -> None:
    """Replace the file at `path` with `data`, atomically, readable by its owner only."""
    directory = path.parent
    # mkstemp creates the file 0600 from the start: the keys are never
    # readable by others, not even for the moment before a chmod.
    fd, temp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    _fsync_directory(directory)  # make the rename itself durable


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _why(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


class LocalKeyringControl:
    """A `KeyringControl` for this node alone: apply a change, persist it.

    A change is tried on a copy and written to the file before the live
    keyring (the one the shell seals with) sees it: a refused change or a
    failed write leaves both as they were. One change at a time, so that the
    file always holds the last change applied.
    """

    def __init__(self, keyring: Keyring, store_path: Path | None = None) -> None:
        self.keyring = keyring
        self.store_path = store_path  # None: nothing persisted (tests, an ephemeral agent)
        self._lock = asyncio.Lock()

    def list(self) -> dict[str, Any]:
        return keyring_view(self.keyring)

    async def install(self, key: bytes) -> None:
        await self._apply(lambda keyring: keyring.install(key))

    async def use(self, key: bytes) -> None:
        await self._apply(lambda keyring: keyring.use(key))

    async def remove(self, key: bytes) -> None:
        await self._apply(lambda keyring: keyring.remove(key))

    async def _apply(self, change: Callable[[Keyring], object]) -> None:
        async with self._lock:
            candidate = self.keyring.copy()
            change(candidate)  # raises KeyringError before anything changed
            if self.store_path is not None:
                await asyncio.to_thread(save_keyring, self.store_path, candidate)
            change(self.keyring)
