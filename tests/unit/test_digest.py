"""The state digest: order-free, version-sensitive, blind to tombstones; announcements checked."""

from __future__ import annotations

import pytest

from mesh.core.model import Network, Service, Version
from mesh.digest import DIGEST_OP, Digest, PeerDigests, decode, digest_of


def net(name: str, clock: int = 1, deleted: bool = False) -> Network:
    return Network(
        name=name,
        id=name,
        driver="overlay",
        subnet="10.0.1.0/24",
        gateway="10.0.1.1",
        version=Version(clock, "n1"),
        deleted=deleted,
    )


def test_same_records_in_any_order_give_one_digest() -> None:
    a, b = net("a"), Service(name="b", id="b", version=Version(2, "n2"))
    assert digest_of([a, b]) == digest_of([b, a])
    assert digest_of([a, b]).records == 2


def test_another_version_changes_the_digest() -> None:
    assert digest_of([net("a", 1)]) != digest_of([net("a", 2)])


def test_tombstones_do_not_count() -> None:
    assert digest_of([net("a"), net("gone", deleted=True)]) == digest_of([net("a")])


def test_announcement_round_trip_and_garbage() -> None:
    digest = digest_of([net("a")])
    assert decode(digest.encode("n1", 5.0)) == ("n1", digest, 5.0)
    for bad in (
        b'{"node": "n1"}',
        b"[]",
        b'{"node": "", "digest": "' + b"0" * 32 + b'", "records": 1}',
        b'{"node": "x", "digest": "zz", "records": 1}',
        b'{"node": "x", "digest": "' + b"g" * 32 + b'", "records": 1}',
        b'{"node": "x", "digest": "' + b"0" * 32 + b'", "records": true, "at": 1}',
        b'{"node": "x", "digest": "' + b"0" * 32 + b'", "records": 1}',
        b'{"node": "x", "digest": "' + b"0" * 32 + b'", "records": 1, "at": "1"}',
    ):
        with pytest.raises(ValueError, match=r"digest|invalid literal"):
            decode(DIGEST_OP + bad)


def test_peer_digests_keep_the_latest_with_its_age() -> None:
    peers = PeerDigests()
    peers.record("n2", Digest("0" * 32, 1), sent_at=100.0, now=10.0)
    peers.record("n2", Digest("1" * 32, 2), sent_at=101.0, now=12.0)
    peers.record("n2", Digest("2" * 32, 3), sent_at=100.5, now=12.5)  # older, late: ignored
    assert peers.view(now=13.5) == [{"node": "n2", "digest": "1" * 32, "records": 2, "age": 1.5}]
    peers.forget("n2")
    assert peers.view(now=14.0) == []
