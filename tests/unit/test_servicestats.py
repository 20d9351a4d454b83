"""ServiceStats: the backends' counts per virtual service folded into totals per service."""

from __future__ import annotations

from lb.servicestats import ServiceStats
from lb.table import ANY_ADDRESS, VirtualKey

WEB = VirtualKey("tcp", "10.0.0.2", 80)
WEB_PUBLISHED = VirtualKey("tcp", ANY_ADDRESS, 8080)
DB = VirtualKey("tcp", "10.0.0.3", 5432)
OWNERS = {WEB: "web", WEB_PUBLISHED: "web", DB: "db"}


def test_a_service_adds_up_its_virtual_services_and_levels_are_current() -> None:
    stats = ServiceStats()
    stats.fold(
        {
            WEB: {"connections": 3, "bytes_in": 100, "active": 1},
            WEB_PUBLISHED: {"connections": 2, "bytes_in": 50, "active": 2},
            DB: {"connections": 1},
        },
        OWNERS.get,
    )
    assert stats.snapshot() == {
        "web": {"connections": 5, "bytes_in": 150, "active": 3},
        "db": {"connections": 1},  # nothing made up for what the backend cannot count
    }
    stats.fold({WEB: {"connections": 4, "bytes_in": 120, "active": 0}}, OWNERS.get)
    # the published port's object is gone: its counts stay, its level goes
    assert stats.snapshot()["web"] == {"connections": 6, "bytes_in": 170, "active": 0}


def test_an_object_made_anew_never_takes_the_total_back() -> None:
    stats = ServiceStats()
    stats.fold({WEB: {"connections": 10}}, OWNERS.get)
    stats.fold({}, OWNERS.get)  # the kernel object was deleted
    stats.fold({WEB: {"connections": 2}}, OWNERS.get)  # and made again: 2 new
    assert stats.snapshot()["web"]["connections"] == 12
    stats.fold({WEB: {"connections": 1}}, OWNERS.get)  # reset between readings: 1 new
    assert stats.snapshot()["web"]["connections"] == 13


def test_a_removed_service_is_forgotten_and_an_ownerless_key_counts_for_nobody() -> None:
    stats = ServiceStats()
    stats.fold({WEB: {"connections": 1}, DB: {"connections": 4, "active": 1}}, OWNERS.get)
    stats.retain({"web"})
    assert set(stats.snapshot()) == {"web"}
    stats.fold({WEB: {"connections": 2}, DB: {"connections": 5}}, {WEB: "web"}.get)
    assert stats.snapshot() == {"web": {"connections": 2}}
