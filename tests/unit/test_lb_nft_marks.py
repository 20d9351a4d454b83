"""The nftables backend's mark bit (`--fwmark`): what counts as another rule using it."""

from __future__ import annotations

import pytest

from lb.nft.base import DEFAULT_MASQUERADE_MARK, base_commands
from lb.nft.marks import (
    DEFAULT_FWMARK,
    check_fwmark,
    iptables_clashes,
    nft_clashes,
    parse_fwmark,
)
from mesh.config import DEFAULT_FWMARK as CONFIG_DEFAULT
from mesh.config import ConfigError, load_config


def rule(table: str, *expr: object, chain: str = "c") -> dict[str, object]:
    return {"rule": {"family": "ip", "table": table, "chain": chain, "handle": 3, "expr": expr}}


def mark_match(value: int, mask: int | None = None) -> dict[str, object]:
    left: object = {"meta": {"key": "mark"}}
    if mask is not None:
        left = {"&": [left, mask]}
    return {"match": {"op": "==", "left": left, "right": value}}


def test_the_default_is_not_the_common_0x2000_and_is_one_value_everywhere() -> None:
    assert DEFAULT_FWMARK == CONFIG_DEFAULT == DEFAULT_MASQUERADE_MARK == 0x1000
    assert load_config([], env={}).fwmark == 0x1000
    assert load_config(["--fwmark", "0x40"], env={}).fwmark == 0x40
    for bad in ("0x3000", "0", "0x100000000", "banana"):
        with pytest.raises(ConfigError, match="fwmark"):
            load_config(["--fwmark", bad], env={})
    assert parse_fwmark("4096") == 0x1000
    with pytest.raises(ValueError, match="one bit"):
        check_fwmark(6)
    # the chains use the bit given
    assert any("0x40 == 0x40" in c for c in base_commands("meshplane", 0x40))


def test_nft_rules_that_test_or_set_the_bit_clash_and_ours_do_not() -> None:
    ruleset = {
        "nftables": [
            {"metainfo": {}},
            rule("kube", mark_match(0x4000, 0x4000), chain="KUBE-POSTROUTING"),
            rule("calico", {"mangle": {"key": {"meta": {"key": "mark"}}, "value": 0x1000}}),
            rule("ct", mark_match(0x0F00), chain="other"),
            rule("meshplane", mark_match(0x1000, 0x1000)),
            rule("meshplane_ipvs", mark_match(0x1000, 0x1000)),
            rule("filter", {"match": {"left": {"payload": {"field": "dport"}}, "right": 4096}}),
        ]
    }
    assert nft_clashes(ruleset, 0x1000) == ["nft ip table calico chain c (handle 3)"]
    assert nft_clashes(ruleset, 0x4000) == ["nft ip table kube chain KUBE-POSTROUTING (handle 3)"]
    assert nft_clashes(ruleset, 0x0200) == ["nft ip table ct chain other (handle 3)"]
    assert nft_clashes(ruleset, 0x10) == []
    assert nft_clashes({}, 0x1000) == []


def test_iptables_save_lines_that_match_or_set_the_bit_clash() -> None:
    saved = [
        "*nat",
        ":POSTROUTING ACCEPT [0:0]",
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        "*mangle",
        "-A PREROUTING -j MARK --set-xmark 0x2000/0x2000",
        "-A PREROUTING -d 10.0.0.1 -j MARK --set-mark 257",
        "COMMIT",
    ]
    assert iptables_clashes(saved, 0x4000) == [
        "iptables -t nat -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN"
    ]
    assert iptables_clashes(saved, 0x1000) == []
    assert iptables_clashes(saved, 0x100) == [
        "iptables -t mangle -A PREROUTING -d 10.0.0.1 -j MARK --set-mark 257"
    ]
    # a set with the full mask takes every bit
    whole = ["*mangle", "-A OUTPUT -j MARK --set-xmark 0x2000/0xffffffff"]
    assert len(iptables_clashes(whole, 0x1000)) == 1
