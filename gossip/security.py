"""Gossip encryption and cluster labels: bytes in, bytes out (sans-IO).

The layer between the codec and the shell (docs/gossip.md). The shell calls
`wrap` on every packet and stream it sends and `unwrap` on every one it
receives; everything else here serves those two and the keyring API.

Frames on the wire, after memberlist (security.go, label.go), told apart by
their first byte (the codec's own first byte is its protocol version, 1, so
it can never be taken for either marker):

    no key, no label   <codec bytes>
    no key, label L    [244][len(L)][L]<codec bytes>            label header
    key K              [10][1][nonce:12][AES-GCM(K, codec bytes, aad=L)][tag:16]

With a key the label is not sent: it is the GCM additional data, so traffic
of another cluster (or with another label) fails authentication instead of
being read. Receivers are strict by default, as memberlist with
GossipVerifyIncoming: a node with a keyring drops plaintext (`unencrypted`)
and a node without one drops ciphertext (`encrypted_no_key`).

To move a running plaintext cluster to encryption without downtime a node
with a keyring can relax either side, as memberlist's GossipVerifyIncoming
and GossipVerifyOutgoing do: `verify_incoming=False` accepts plaintext (with
the right label) besides what its keys open, `verify_outgoing=False` sends
plaintext. The steps (docs/gossip.md): install the key with both relaxed,
then send encrypted, then require encryption.

The keyring is memberlist's: index 0 is the primary (the only key that
seals, the first tried to open), every other key still opens, so that a key
can be rotated across a live cluster: install everywhere, use, remove.

Nonces are 96 random bits per message. That is safe up to about 2**32
messages per key (NIST SP 800-38D); operators are expected to rotate keys
long before a gossip cluster sends that many from one key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gossip.errors import DecodeError, GossipError

#: First byte of a label header (memberlist's hasLabelMsg).
LABEL_HEADER: Final = 244
#: First byte of an encrypted frame (memberlist's encryptMsg).
ENCRYPTED: Final = 10
#: Envelope version 1: no padding (memberlist's default since protocol 2).
ENVELOPE_VERSION: Final = 1
NONCE_SIZE: Final = 12
TAG_SIZE: Final = 16
#: Bytes an encrypted frame adds to a message: marker, version, nonce, tag.
OVERHEAD: Final = 2 + NONCE_SIZE + TAG_SIZE
MAX_LABEL: Final = 255
KEY_SIZES: Final = frozenset({16, 24, 32})  # AES-128, AES-192, AES-256

#: Every reason a received frame is dropped for; the shell counts drops by it.
REASONS: Final = frozenset(
    {
        "truncated",
        "bad_version",
        "unauthenticated",
        "label_mismatch",
        "bad_label",
        "unencrypted",
        "encrypted_no_key",
    }
)

NonceSource = Callable[[int], bytes]


class SecurityError(DecodeError):
    """A received frame is dropped; `reason` is one of `REASONS`.

    A `DecodeError`, so that the shell handles both alike where it catches
    bytes from a peer: drop the frame, count it by reason.
    """


class KeyringError(GossipError, ValueError):
    """A key or a keyring change is refused; `code` says why, for the API.

    Codes: `invalid_key` (not base64 of 16, 24 or 32 bytes), `primary_key`
    (the primary cannot be removed), `unknown_key` (not installed),
    `empty_keyring`, `bad_file` (the keyring file cannot be read).
    """

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


# -- keys ------------------------------------------------------------------------


def keygen() -> str:
    """A new AES-256 key, base64 (as `serf keygen` and `consul keygen` hand out)."""
    return base64.b64encode(os.urandom(32)).decode("ascii")


def parse_key(text: str) -> bytes:
    """A base64 key (surrounding whitespace ignored) to its bytes, checked."""
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise KeyringError("the key is not valid base64", "invalid_key") from None
    check_key(key)
    return key


def encode_key(key: bytes) -> str:
    return base64.b64encode(key).decode("ascii")


def check_key(key: bytes) -> None:
    if len(key) not in KEY_SIZES:
        raise KeyringError(f"a key must be 16, 24 or 32 bytes, not {len(key)}", "invalid_key")


def fingerprint(key: bytes) -> str:
    """What the API and logs show instead of a key: 8 hex digits of its SHA-256."""
    return hashlib.sha256(key).hexdigest()[:8]


# -- the keyring -----------------------------------------------------------------


class Keyring:
    """The installed keys, primary first; mutated in place by the keyring API.

    The shell and the keyring control share one instance, so a change applies
    to the next frame sent or received. The AES-GCM contexts are built once
    per key, not once per packet.
    """

    __slots__ = ("_ciphers", "_keys")

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise KeyringError("a keyring needs at least one key", "empty_keyring")
        self._keys: list[bytes] = []
        self._ciphers: dict[bytes, AESGCM] = {}
        for key in keys:
            self.install(key)

    def __repr__(self) -> str:  # never the keys themselves: this ends up in logs
        return f"<Keyring primary={fingerprint(self.primary)} keys={len(self._keys)}>"

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._ciphers

    def __iter__(self) -> Iterator[bytes]:
        """The installed keys, the primary first."""
        return iter(list(self._keys))  # a copy: a change while iterating is no error

    @property
    def primary(self) -> bytes:
        return self._keys[0]

    def keys(self) -> list[bytes]:
        """Every installed key, the primary first."""
        return list(self._keys)

    def copy(self) -> Keyring:
        return Keyring(self._keys)

    def install(self, key: bytes) -> bool:
        """Add a key (not the primary); False when it was installed already."""
        check_key(key)
        if key in self._ciphers:
            return False
        self._keys.append(bytes(key))
        self._ciphers[bytes(key)] = AESGCM(key)
        return True

    def use(self, key: bytes) -> None:
        """Make an installed key the primary: it seals from now on."""
        check_key(key)
        if key not in self._ciphers:
            raise KeyringError(
                f"key {fingerprint(key)} is not installed; install it first", "unknown_key"
            )
        self._keys.remove(key)
        self._keys.insert(0, key)

    def remove(self, key: bytes) -> bool:
        """Remove a key other than the primary; False when it was not installed."""
        check_key(key)
        if key == self.primary:
            raise KeyringError(
                f"key {fingerprint(key)} is the primary; use another key first", "primary_key"
            )
        if key not in self._ciphers:
            return False
        self._keys.remove(key)
        del self._ciphers[key]
        return True

    def ciphers(self) -> list[AESGCM]:
        """The contexts to open with, in the order to try them: the primary first."""
        return [self._ciphers[key] for key in self._keys]


def keyring_view(keyring: Keyring) -> dict[str, Any]:
    """The keyring as the API shows it: fingerprints, never keys."""
    return {
        "keys": [
            {"fingerprint": fingerprint(key), "primary": index == 0}
            for index, key in enumerate(keyring.keys())
        ]
    }


class KeyringControl(Protocol):
    """What the API changes the keyring through.

    The agent's implementation applies a change locally and gossips it to the
    cluster (Serf's `keys -install/-use/-remove`); `LocalKeyringControl` in
    `gossip.keyring_store` applies it to this node only. A refused change
    raises `KeyringError`; a change that cannot be made durable, `OSError`.
    """

    def list(self) -> dict[str, Any]: ...

    async def install(self, key: bytes) -> None: ...

    async def use(self, key: bytes) -> None: ...

    async def remove(self, key: bytes) -> None: ...


# -- the envelope ----------------------------------------------------------------


def seal(
    keyring: Keyring, plaintext: bytes, label: bytes = b"", nonce_source: NonceSource = os.urandom
) -> bytes:
    """[version][nonce][ciphertext + tag] under the primary key, the label as AAD."""
    nonce = nonce_source(NONCE_SIZE)
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"the nonce source gave {len(nonce)} bytes, not {NONCE_SIZE}")
    sealed = keyring.ciphers()[0].encrypt(nonce, plaintext, label)
    return bytes([ENVELOPE_VERSION]) + nonce + sealed


def open_(keyring: Keyring, data: bytes, label: bytes = b"") -> bytes:
    """The plaintext of an envelope, opened by the first key that authenticates it."""
    if not data:
        raise SecurityError("truncated", "empty envelope")
    if data[0] != ENVELOPE_VERSION:
        raise SecurityError("bad_version", f"envelope version {data[0]}")
    if len(data) < 1 + NONCE_SIZE + TAG_SIZE:
        raise SecurityError("truncated", f"envelope of {len(data)} bytes")
    nonce, sealed = data[1 : 1 + NONCE_SIZE], data[1 + NONCE_SIZE :]
    for cipher in keyring.ciphers():
        try:
            return cipher.decrypt(nonce, sealed, label)
        except InvalidTag:
            continue
    raise SecurityError("unauthenticated", f"no installed key opens it ({len(keyring)} tried)")


# -- labels ----------------------------------------------------------------------


def check_label(label: bytes) -> None:
    """A configuration check: the shell should call it once, at start."""
    if len(label) > MAX_LABEL:
        raise ValueError(f"a cluster label is at most {MAX_LABEL} bytes, not {len(label)}")


def add_label(data: bytes, label: bytes) -> bytes:
    """[244][len][label] before `data`; nothing for the empty label."""
    check_label(label)
    if not label:
        return data
    return bytes([LABEL_HEADER, len(label)]) + label + data


def strip_label(data: bytes) -> tuple[bytes, bytes]:
    """(label, rest) of a received frame; the empty label when it has no header."""
    if not data or data[0] != LABEL_HEADER:
        return b"", data
    if len(data) < 2:
        raise SecurityError("truncated", "label header without a length")
    size = data[1]
    if size == 0:  # a sender never writes one (memberlist refuses it too)
        raise SecurityError("bad_label", "empty label in a label header")
    if len(data) < 2 + size:
        raise SecurityError("truncated", f"label of {size} bytes cut short")
    return data[2 : 2 + size], data[2 + size :]


# -- what the shell calls --------------------------------------------------------


def wrap(
    data: bytes,
    keyring: Keyring | None,
    label: bytes = b"",
    nonce_source: NonceSource = os.urandom,
    *,
    verify_outgoing: bool = True,
) -> bytes:
    """The frame to send for the codec's `data`: sealed with a keyring, else labelled.

    `verify_outgoing=False` (a cluster moving to encryption): labelled plaintext
    even with a keyring, so that nodes without the key still read it."""
    if keyring is None or not verify_outgoing:
        return add_label(data, label)
    check_label(label)
    return bytes([ENCRYPTED]) + seal(keyring, data, label, nonce_source)


def unwrap(
    data: bytes, keyring: Keyring | None, label: bytes = b"", *, verify_incoming: bool = True
) -> bytes:
    """The codec's bytes of a received frame, or `SecurityError` to drop it.

    `verify_incoming=False` (a cluster moving to encryption): a node with a
    keyring also takes labelled plaintext; what is encrypted must still open."""
    if not data:
        raise SecurityError("truncated", "empty frame")
    encrypted = data[0] == ENCRYPTED
    if keyring is None:
        if encrypted:
            raise SecurityError("encrypted_no_key", "this node has no keyring")
        return _check_label(data, label)
    if not encrypted:
        if not verify_incoming:
            return _check_label(data, label)
        raise SecurityError("unencrypted", "this node accepts encrypted frames only")
    return open_(keyring, data[1:], label)


def _check_label(data: bytes, label: bytes) -> bytes:
    got, rest = strip_label(data)
    if got != label:
        raise SecurityError("label_mismatch", f"label {got!r}, expected {label!r}")
    return rest
