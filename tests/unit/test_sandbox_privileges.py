"""Privilege detection at start (mesh/sandbox/privileges.py): one line naming what lacks."""

from __future__ import annotations

from pathlib import Path

from mesh.sandbox.privileges import effective_capabilities, missing_privileges

ROOT_STATUS = "Name:\tmesh\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n"
NET_ADMIN_ONLY = "CapEff:\t0000000000001000\n"  # bit 12
NONE = "CapEff:\t0000000000000000\n"


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "status"
    path.write_text(text)
    return str(path)


def test_capabilities_are_read_from_cap_eff() -> None:
    assert effective_capabilities(ROOT_STATUS) >> 21 & 1
    assert effective_capabilities(NET_ADMIN_ONLY) == 1 << 12
    assert effective_capabilities("Name:\tx\n") == 0


def test_full_capabilities_and_a_writable_dir_are_enough(tmp_path: Path) -> None:
    status = write(tmp_path, ROOT_STATUS)
    assert missing_privileges(status, str(tmp_path / "netns")) is None


def test_what_lacks_is_named_in_one_line(tmp_path: Path) -> None:
    reason = missing_privileges(write(tmp_path, NET_ADMIN_ONLY), str(tmp_path))
    assert reason == ("needs root or CAP_NET_ADMIN and CAP_SYS_ADMIN (lacking CAP_SYS_ADMIN)")
    reason = missing_privileges(write(tmp_path, NONE), str(tmp_path))
    assert reason is not None and "lacking CAP_NET_ADMIN, CAP_SYS_ADMIN" in reason
    assert "\n" not in reason
    unreadable = missing_privileges(str(tmp_path / "absent"), str(tmp_path))
    assert unreadable is not None and unreadable.startswith("cannot read")
