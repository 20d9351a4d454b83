"""Join tokens: the gossip keyring and the cluster label in one copy-pasteable string (sans-IO).

`mesh join-token` prints one on a member; `mesh agent --join HOST --token TOKEN`
(or `MESH_JOIN_TOKEN`, or `--token-file FILE`) joins with it. The token is
everything a node needs to talk to the cluster's gossip: whoever holds it can
join, so it is a secret exactly as the keyring file is.

    mesh1.<base64url, no padding, of:>
        [count]([size][key bytes]) * count   the keys, the primary first
        [size][label bytes]                   the cluster label, UTF-8 (size 0: none)
        [checksum:4]                          first 4 bytes of SHA-256 of all the above

The version is in the prefix (`mesh1.`), so a later format is refused with a
line that says so instead of being misread. The checksum turns a token cut
short or mistyped while copying into a clear error at start, rather than a
wrong key whose packets the cluster silently drops.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass, field
from typing import Final

from gossip.security import MAX_LABEL, Keyring, KeyringError, check_key

PREFIX: Final = "mesh"
VERSION: Final = 1
CHECKSUM_SIZE: Final = 4
#: keys a token may carry: a keyring mid-rotation holds two or three
MAX_KEYS: Final = 16


class JoinTokenError(ValueError):
    """A string that is not a usable join token; the message says why, never the key."""


@dataclass(frozen=True, slots=True)
class JoinToken:
    #: the keyring's keys, the primary first
    keys: tuple[bytes, ...] = field(repr=False)
    label: str = ""

    def keyring(self) -> Keyring:
        return Keyring(list(self.keys))


def encode(keys: list[bytes] | tuple[bytes, ...], label: str = "") -> str:
    """The token for `keys` (primary first) and `label`."""
    if not keys:
        raise JoinTokenError("a join token needs at least one key")
    if len(keys) > MAX_KEYS:
        raise JoinTokenError(f"a join token carries at most {MAX_KEYS} keys")
    raw_label = label.encode("utf-8")
    if len(raw_label) > MAX_LABEL:
        raise JoinTokenError(f"a cluster label is at most {MAX_LABEL} bytes")
    body = bytearray([len(keys)])
    for key in keys:
        check_key(key)
        body += bytes([len(key)]) + key
    body += bytes([len(raw_label)]) + raw_label
    body += hashlib.sha256(body).digest()[:CHECKSUM_SIZE]
    text = base64.urlsafe_b64encode(bytes(body)).decode("ascii").rstrip("=")
    return f"{PREFIX}{VERSION}.{text}"


def decode(text: str) -> JoinToken:
    """The keys and label of a token (surrounding whitespace ignored), or JoinTokenError."""
    token = text.strip()
    head, dot, payload = token.partition(".")
    if not dot or not head.startswith(PREFIX):
        raise JoinTokenError("a join token starts with 'mesh1.': print one with `mesh join-token`")
    if head != f"{PREFIX}{VERSION}":
        raise JoinTokenError(
            f"join token version {head[len(PREFIX) :]!r} is not supported (this agent reads "
            f"{PREFIX}{VERSION}.): print one with this version's `mesh join-token`"
        )
    try:
        padded = payload + "=" * (-len(payload) % 4)
        body = base64.b64decode(padded, altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise JoinTokenError("the join token is not valid base64url: was it cut?") from None
    if len(body) < 1 + CHECKSUM_SIZE:
        raise JoinTokenError("the join token is too short: was it cut?")
    content, checksum = body[:-CHECKSUM_SIZE], body[-CHECKSUM_SIZE:]
    if hashlib.sha256(content).digest()[:CHECKSUM_SIZE] != checksum:
        raise JoinTokenError("the join token's checksum does not match: was it cut or mistyped?")
    return _parse(content)


def _parse(content: bytes) -> JoinToken:
    count, at = content[0], 1
    if not 1 <= count <= MAX_KEYS:
        raise JoinTokenError(f"the join token holds {count} keys (1 to {MAX_KEYS})")
    keys = []
    for _ in range(count):
        key, at = _chunk(content, at)
        try:
            check_key(key)
        except KeyringError as exc:
            raise JoinTokenError(f"the join token holds an unusable key: {exc}") from None
        keys.append(key)
    raw_label, at = _chunk(content, at)
    if at != len(content):
        raise JoinTokenError("the join token has bytes after its label")
    try:
        label = raw_label.decode("utf-8")
    except UnicodeDecodeError:
        raise JoinTokenError("the join token's cluster label is not UTF-8") from None
    return JoinToken(tuple(keys), label)


def _chunk(content: bytes, at: int) -> tuple[bytes, int]:
    if at >= len(content):
        raise JoinTokenError("the join token is cut short")
    size = content[at]
    end = at + 1 + size
    if end > len(content):
        raise JoinTokenError("the join token is cut short")
    return content[at + 1 : end], end
