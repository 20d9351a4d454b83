"""The sysctls a backend sets are put back at close, and after a kill -9 (lb/sysctls.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lb.ipvs.host import strict_arp_sysctls, swarm_sysctls
from lb.sysctls import LEDGER_NAME, SysctlError, SysctlLedger, restore_leftover

KEYS = {
    "net/ipv4/vs/conntrack": "0",
    "net/ipv4/vs/expire_nodest_conn": "0",
    "net/ipv4/conf/all/arp_ignore": "0",
    "net/ipv4/conf/all/arp_announce": "0",
    "net/ipv4/ip_forward": "0",
}


def fake_proc(tmp_path: Path, values: dict[str, str]) -> Path:
    root = tmp_path / "proc-sys"
    for key, value in values.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_text(value + "\n")
    return root


def read(root: Path) -> dict[str, str]:
    return {key: (root / key).read_text().strip() for key in KEYS}


WANTED = {
    "net/ipv4/vs/conntrack": "1",
    "net/ipv4/vs/expire_nodest_conn": "1",
    "net/ipv4/conf/all/arp_ignore": "1",
    "net/ipv4/conf/all/arp_announce": "2",
    "net/ipv4/ip_forward": "1",
}


def test_the_ipvs_backend_asks_for_these() -> None:
    assert set(WANTED) <= {**swarm_sysctls(), **strict_arp_sysctls()}.keys()


def test_values_are_put_back_at_close_but_ip_forward_stays_on(tmp_path: Path) -> None:
    root = fake_proc(tmp_path, KEYS)
    ledger = SysctlLedger(tmp_path / "data" / LEDGER_NAME, root)
    ledger.apply(WANTED)
    assert read(root) == WANTED
    recorded = json.loads((tmp_path / "data" / LEDGER_NAME).read_text())
    assert "net/ipv4/ip_forward" not in recorded and recorded["net/ipv4/vs/conntrack"] == "0"
    ledger.restore()
    assert read(root) == {**KEYS, "net/ipv4/ip_forward": "1"}
    assert not (tmp_path / "data" / LEDGER_NAME).exists()


def test_a_kill_9_keeps_the_originals_for_the_next_run(tmp_path: Path) -> None:
    root = fake_proc(tmp_path, {**KEYS, "net/ipv4/conf/all/arp_announce": "1"})
    path = tmp_path / LEDGER_NAME
    SysctlLedger(path, root).apply(WANTED)  # then killed: nothing restored
    # The next run finds the agent's own values in the kernel: the originals stay.
    again = SysctlLedger(path, root)
    again.apply(WANTED)
    assert json.loads(path.read_text())["net/ipv4/conf/all/arp_announce"] == "1"
    again.restore()
    assert read(root)["net/ipv4/conf/all/arp_announce"] == "1"
    assert read(root)["net/ipv4/vs/conntrack"] == "0"
    # A run killed, then a start on another backend: put back at that start.
    SysctlLedger(path, root).apply(WANTED)
    restored = restore_leftover(tmp_path, root)
    assert restored["net/ipv4/vs/conntrack"] == "0"
    assert read(root)["net/ipv4/vs/conntrack"] == "0" and not path.exists()
    assert restore_leftover(tmp_path, root) == {}


def test_a_value_already_as_wanted_is_not_recorded_and_errors_name_the_setting(
    tmp_path: Path,
) -> None:
    root = fake_proc(tmp_path, {**KEYS, "net/ipv4/vs/conntrack": "1"})
    ledger = SysctlLedger(None, root)
    ledger.apply(WANTED)
    assert "net/ipv4/vs/conntrack" not in ledger.originals()
    with pytest.raises(SysctlError, match=r"net\.ipv4\.vs\.missing"):
        ledger.apply({"net/ipv4/vs/missing": "1"})
