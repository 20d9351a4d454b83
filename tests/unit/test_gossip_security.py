"""gossip.security and gossip.keyring_store: the envelope, labels, the keyring, its file.

No sockets: frames are built and taken apart in memory, with an injected
nonce source where a test needs to know the bytes.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip import security
from gossip.errors import DecodeError
from gossip.keyring_store import (
    LocalKeyringControl,
    decode,
    encode,
    load_keyring,
    save_keyring,
)
from gossip.security import (
    ENCRYPTED,
    LABEL_HEADER,
    NONCE_SIZE,
    OVERHEAD,
    TAG_SIZE,
    Keyring,
    KeyringError,
    SecurityError,
    fingerprint,
    keygen,
    open_,
    parse_key,
    seal,
    unwrap,
    wrap,
)

K1 = bytes(range(32))
K2 = bytes(range(100, 116))  # AES-128
K3 = bytes(range(200, 224))  # AES-192
MESSAGE = b"\x01\x00ping body"  # what the codec hands over: version 1, then a type


def fixed_nonce(byte: int) -> Callable[[int], bytes]:
    return lambda size: bytes([byte]) * size


def reason(call: Callable[[], object]) -> str:
    with pytest.raises(SecurityError) as caught:
        call()
    return caught.value.reason


# -- keys ------------------------------------------------------------------------


def test_keygen_hands_out_32_random_bytes_in_base64() -> None:
    keys = {keygen() for _ in range(50)}
    assert len(keys) == 50
    assert all(len(base64.b64decode(k)) == 32 for k in keys)


@pytest.mark.parametrize("size", [16, 24, 32])
def test_parse_key_takes_aes_key_sizes(size: int) -> None:
    key = os.urandom(size)
    assert parse_key(" " + base64.b64encode(key).decode() + "\n") == key


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not base64!",
        base64.b64encode(b"x" * 15).decode(),
        base64.b64encode(b"x" * 33).decode(),
        "QUJD=ZZ",
    ],
)
def test_parse_key_refuses_what_is_not_a_key(text: str) -> None:
    with pytest.raises(KeyringError) as caught:
        parse_key(text)
    assert caught.value.code == "invalid_key"


def test_fingerprint_is_short_and_stable() -> None:
    assert fingerprint(K1) == fingerprint(bytes(K1))
    assert len(fingerprint(K1)) == 8
    assert fingerprint(K1) != fingerprint(K2)


# -- the envelope ----------------------------------------------------------------


def test_seal_then_open_round_trips_with_each_key_size() -> None:
    for key in (K1, K2, K3):
        ring = Keyring([key])
        assert open_(ring, seal(ring, MESSAGE, b"prod"), b"prod") == MESSAGE


def test_envelope_layout_is_version_nonce_ciphertext_tag() -> None:
    sealed = seal(Keyring([K1]), MESSAGE, nonce_source=fixed_nonce(7))
    assert sealed[0] == 1
    assert sealed[1 : 1 + NONCE_SIZE] == bytes([7]) * NONCE_SIZE
    assert len(sealed) == 1 + NONCE_SIZE + len(MESSAGE) + TAG_SIZE
    assert MESSAGE not in sealed


def test_nonce_source_must_give_twelve_bytes() -> None:
    with pytest.raises(ValueError, match="nonce"):
        seal(Keyring([K1]), MESSAGE, nonce_source=lambda size: b"short")


def test_every_seal_draws_a_fresh_nonce() -> None:
    ring = Keyring([K1])
    nonces = {seal(ring, MESSAGE)[1 : 1 + NONCE_SIZE] for _ in range(20_000)}
    assert len(nonces) == 20_000


def test_any_flipped_bit_fails_authentication() -> None:
    ring = Keyring([K1])
    sealed = seal(ring, MESSAGE)
    for index in range(1, len(sealed)):  # byte 0 is the version: bad_version, below
        tampered = bytearray(sealed)
        tampered[index] ^= 0x01
        with pytest.raises(SecurityError, match="unauthenticated"):
            open_(ring, bytes(tampered))


def test_a_key_not_installed_fails_authentication() -> None:
    sealed = seal(Keyring([K1]), MESSAGE)
    assert reason(lambda: open_(Keyring([K2, K3]), sealed)) == "unauthenticated"


def test_any_installed_key_opens() -> None:
    sealed = seal(Keyring([K2]), MESSAGE)
    assert open_(Keyring([K1, K3, K2]), sealed) == MESSAGE


def test_envelope_errors_name_their_reason() -> None:
    ring = Keyring([K1])
    sealed = seal(ring, MESSAGE)
    assert reason(lambda: open_(ring, b"")) == "truncated"
    assert reason(lambda: open_(ring, sealed[: 1 + NONCE_SIZE + TAG_SIZE - 1])) == "truncated"
    assert reason(lambda: open_(ring, b"\x00" + sealed[1:])) == "bad_version"


def test_an_empty_message_seals_too() -> None:
    ring = Keyring([K1])
    assert open_(ring, seal(ring, b"")) == b""


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200), label=st.binary(max_size=8))
def test_open_of_arbitrary_bytes_raises_only_security_error(data: bytes, label: bytes) -> None:
    # Random bytes never authenticate (that would be a forged GCM tag), so this always raises.
    assert reason(lambda: open_(Keyring([K1, K2]), data, label)) in security.REASONS


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200), keyed=st.booleans(), label=st.binary(max_size=8))
def test_unwrap_of_arbitrary_bytes_answers_or_raises_only_security_error(
    data: bytes, keyed: bool, label: bytes
) -> None:
    caught: SecurityError | None = None
    try:
        unwrap(data, Keyring([K1]) if keyed else None, label)
    except SecurityError as exc:  # anything else fails the test
        caught = exc
    assert caught is None or caught.reason in security.REASONS


# -- frames and labels -----------------------------------------------------------


def test_plain_frame_without_label_is_the_message_itself() -> None:
    assert wrap(MESSAGE, None) == MESSAGE
    assert unwrap(MESSAGE, None) == MESSAGE


def test_plain_frame_with_label_carries_the_memberlist_header() -> None:
    frame = wrap(MESSAGE, None, b"prod")
    assert frame == bytes([LABEL_HEADER, 4]) + b"prod" + MESSAGE
    assert unwrap(frame, None, b"prod") == MESSAGE


@pytest.mark.parametrize(
    ("sent", "expected"), [(b"", b"prod"), (b"prod", b""), (b"prod", b"test"), (b"prod", b"prodx")]
)
def test_label_mismatch_without_key_is_dropped(sent: bytes, expected: bytes) -> None:
    frame = wrap(MESSAGE, None, sent)
    assert reason(lambda: unwrap(frame, None, expected)) == "label_mismatch"


def test_label_mismatch_with_key_fails_authentication() -> None:
    ring = Keyring([K1])
    frame = wrap(MESSAGE, ring, b"prod")
    assert b"prod" not in frame  # with a key the label is bound, not sent
    assert unwrap(frame, ring, b"prod") == MESSAGE
    assert reason(lambda: unwrap(frame, ring, b"test")) == "unauthenticated"
    assert reason(lambda: unwrap(frame, ring, b"")) == "unauthenticated"


def test_encrypted_frame_layout_and_overhead() -> None:
    frame = wrap(MESSAGE, Keyring([K1]), b"prod")
    assert frame[0] == ENCRYPTED
    assert len(frame) == len(MESSAGE) + OVERHEAD


def test_keyed_node_drops_plaintext() -> None:
    ring = Keyring([K1])
    assert reason(lambda: unwrap(MESSAGE, ring)) == "unencrypted"
    assert reason(lambda: unwrap(wrap(MESSAGE, None, b"prod"), ring, b"prod")) == "unencrypted"


def test_keyless_node_drops_ciphertext() -> None:
    frame = wrap(MESSAGE, Keyring([K1]), b"prod")
    assert reason(lambda: unwrap(frame, None, b"prod")) == "encrypted_no_key"
    assert reason(lambda: unwrap(frame, None)) == "encrypted_no_key"


def test_malformed_label_headers_are_dropped() -> None:
    assert reason(lambda: unwrap(b"", None)) == "truncated"
    assert reason(lambda: unwrap(bytes([LABEL_HEADER]), None)) == "truncated"
    assert reason(lambda: unwrap(bytes([LABEL_HEADER, 5]) + b"abc", None, b"abcde")) == "truncated"
    assert reason(lambda: unwrap(bytes([LABEL_HEADER, 0]) + MESSAGE, None)) == "bad_label"


def test_labels_are_at_most_255_bytes() -> None:
    label = b"x" * 255
    assert unwrap(wrap(MESSAGE, None, label), None, label) == MESSAGE
    with pytest.raises(ValueError, match="255"):
        wrap(MESSAGE, None, label + b"x")
    with pytest.raises(ValueError, match="255"):
        wrap(MESSAGE, Keyring([K1]), label + b"x")


def test_security_error_is_a_decode_error_for_the_shell() -> None:
    error = SecurityError("unauthenticated", "detail")
    assert isinstance(error, DecodeError)
    assert error.reason == "unauthenticated"
    assert "unauthenticated" in str(error)
    assert not security.REASONS & {"unknown_type", "bad_fields"}  # no clash with the codec's


# -- the keyring -----------------------------------------------------------------


def test_keyring_primary_is_the_first_key_and_duplicates_collapse() -> None:
    ring = Keyring([K1, K2, K1])
    assert ring.primary == K1
    assert ring.keys() == [K1, K2]
    assert list(ring) == [K1, K2]
    assert K2 in ring
    assert len(ring) == 2


def test_keyring_refuses_no_keys_and_bad_keys() -> None:
    with pytest.raises(KeyringError) as empty:
        Keyring([])
    assert empty.value.code == "empty_keyring"
    with pytest.raises(KeyringError) as bad:
        Keyring([b"short"])
    assert bad.value.code == "invalid_key"


def test_rotation_install_use_remove() -> None:
    old = Keyring([K1])
    ring = Keyring([K1])
    before = seal(old, MESSAGE)

    assert ring.install(K2) is True
    assert ring.primary == K1  # installing does not change what seals
    assert open_(ring, seal(Keyring([K2]), MESSAGE)) == MESSAGE

    ring.use(K2)
    assert ring.keys() == [K2, K1]
    sealed = seal(ring, MESSAGE)
    assert open_(Keyring([K2]), sealed) == MESSAGE
    assert open_(ring, before) == MESSAGE  # the old key still opens until removed

    assert ring.remove(K1) is True
    assert ring.keys() == [K2]
    assert reason(lambda: open_(ring, before)) == "unauthenticated"


def test_install_and_remove_are_idempotent() -> None:
    ring = Keyring([K1, K2])
    assert ring.install(K2) is False
    assert ring.remove(K3) is False
    assert ring.keys() == [K1, K2]


def test_remove_primary_is_refused() -> None:
    ring = Keyring([K1, K2])
    with pytest.raises(KeyringError) as caught:
        ring.remove(K1)
    assert caught.value.code == "primary_key"
    assert ring.keys() == [K1, K2]


def test_use_of_a_key_not_installed_is_refused() -> None:
    ring = Keyring([K1])
    with pytest.raises(KeyringError) as caught:
        ring.use(K2)
    assert caught.value.code == "unknown_key"
    assert ring.primary == K1


def test_keyring_never_shows_its_keys() -> None:
    ring = Keyring([K1, K2])
    assert K1.hex() not in repr(ring)
    assert fingerprint(K1) in repr(ring)
    assert security.keyring_view(ring) == {
        "keys": [
            {"fingerprint": fingerprint(K1), "primary": True},
            {"fingerprint": fingerprint(K2), "primary": False},
        ]
    }


def test_copy_is_independent() -> None:
    ring = Keyring([K1])
    copy = ring.copy()
    copy.install(K2)
    assert ring.keys() == [K1]


# -- the keyring file ------------------------------------------------------------


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def test_save_then_load_round_trips_with_the_primary(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    ring = Keyring([K1, K2])
    ring.use(K2)
    save_keyring(path, ring)
    assert load_keyring(path).keys() == [K2, K1]
    assert json.loads(path.read_text()) == {"keys": [b64(K2), b64(K1)], "primary": b64(K2)}


def test_saved_file_is_private_and_no_temporary_is_left(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    path.write_text("old")
    path.chmod(0o644)
    save_keyring(path, Keyring([K1]))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["keyring.json"]


def test_a_failed_save_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "keyring.json"
    save_keyring(path, Keyring([K1]))

    def broken(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="space"):
        save_keyring(path, Keyring([K2]))
    assert load_keyring(path).keys() == [K1]
    assert [p.name for p in tmp_path.iterdir()] == ["keyring.json"]


def test_load_reads_the_hand_written_forms() -> None:
    assert decode(f'["{b64(K2)}", "{b64(K1)}"]').keys() == [K2, K1]  # Serf's file
    assert decode(b64(K1) + "\n").keys() == [K1]  # mesh keygen > FILE
    assert decode(json.dumps({"keys": [b64(K1), b64(K2)]})).keys() == [K1, K2]
    assert decode(json.dumps({"keys": [b64(K1), b64(K2)], "primary": b64(K2)})).primary == K2
    assert decode(encode(Keyring([K3, K1]))).keys() == [K3, K1]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{",
        "[]",
        "{}",
        "42",
        '{"keys": "x"}',
        '{"keys": [1]}',
        json.dumps({"keys": [b64(K1)], "primary": b64(K2)}),
        json.dumps({"keys": [b64(K1)], "primary": 1}),
        json.dumps({"keys": ["short"]}),
    ],
)
def test_load_refuses_a_bad_file_naming_it(tmp_path: Path, text: str) -> None:
    path = tmp_path / "keyring.json"
    path.write_text(text)
    with pytest.raises(KeyringError) as caught:
        load_keyring(path)
    assert caught.value.code == "bad_file"
    assert str(path) in str(caught.value)


def test_load_of_a_missing_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(KeyringError, match="No such file") as caught:
        load_keyring(tmp_path / "absent.json")
    assert caught.value.code == "bad_file"


# -- the node-local control ------------------------------------------------------


def test_local_control_applies_and_persists(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    ring = Keyring([K1])
    control = LocalKeyringControl(ring, path)

    async def rotate() -> None:
        await control.install(K2)
        await control.use(K2)
        await control.remove(K1)

    asyncio.run(rotate())
    assert ring.keys() == [K2]
    assert load_keyring(path).keys() == [K2]
    assert control.list() == {"keys": [{"fingerprint": fingerprint(K2), "primary": True}]}


def test_local_control_changes_nothing_when_refused_or_not_durable(tmp_path: Path) -> None:
    ring = Keyring([K1])
    refused = LocalKeyringControl(ring, tmp_path / "keyring.json")
    with pytest.raises(KeyringError):
        asyncio.run(refused.remove(K1))
    assert not (tmp_path / "keyring.json").exists()

    unwritable = LocalKeyringControl(ring, tmp_path / "no" / "such" / "dir" / "keyring.json")
    with pytest.raises(FileNotFoundError):
        asyncio.run(unwritable.install(K2))
    assert ring.keys() == [K1]


def test_local_control_without_a_file_only_applies() -> None:
    ring = Keyring([K1])
    asyncio.run(LocalKeyringControl(ring).install(K2))
    assert ring.keys() == [K1, K2]


# -- moving a plaintext cluster to encryption (verify_incoming / verify_outgoing) -------


def test_relaxed_incoming_takes_labelled_plaintext_and_still_opens_ciphertext() -> None:
    ring = Keyring([K1])
    plain = wrap(MESSAGE, None, b"prod")
    assert unwrap(plain, ring, b"prod", verify_incoming=False) == MESSAGE
    assert unwrap(wrap(MESSAGE, ring, b"prod"), ring, b"prod", verify_incoming=False) == MESSAGE
    # Relaxed is not open: the label still binds, and ciphertext must still authenticate.
    assert reason(lambda: unwrap(plain, ring, b"dev", verify_incoming=False)) == "label_mismatch"
    stranger = wrap(MESSAGE, Keyring([K2]), b"prod")
    assert reason(lambda: unwrap(stranger, ring, b"prod", verify_incoming=False)) == (
        "unauthenticated"
    )


def test_relaxed_outgoing_sends_what_a_keyless_node_reads() -> None:
    ring = Keyring([K1])
    frame = wrap(MESSAGE, ring, b"prod", verify_outgoing=False)
    assert frame == wrap(MESSAGE, None, b"prod")
    assert unwrap(frame, None, b"prod") == MESSAGE
    # A strict keyed node drops it, as before.
    assert reason(lambda: unwrap(frame, ring, b"prod")) == "unencrypted"


@pytest.mark.parametrize(
    ("sender", "receiver"),
    [
        # (keyring?, verify_outgoing) of the sender; (keyring?, verify_incoming) of the receiver
        ((False, True), (True, False)),  # plaintext node -> key installed, accepting both
        ((True, False), (False, True)),  # key installed, still sending plain -> plaintext node
        ((True, True), (True, False)),  # sending encrypted -> accepting both
        ((True, False), (True, False)),
        ((True, True), (True, True)),  # the end: encrypted everywhere
    ],
)
def test_each_migration_step_talks_to_its_neighbours(
    sender: tuple[bool, bool], receiver: tuple[bool, bool]
) -> None:
    """Two nodes one step apart in the migration (docs/gossip.md) understand each other."""
    ring = Keyring([K1])
    frame = wrap(MESSAGE, ring if sender[0] else None, b"L", verify_outgoing=sender[1])
    got = unwrap(frame, ring if receiver[0] else None, b"L", verify_incoming=receiver[1])
    assert got == MESSAGE
