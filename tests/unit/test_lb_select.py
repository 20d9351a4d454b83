"""`--lb`: which backend runs, and why, with the machine's answers given by the test."""

from __future__ import annotations

import types
from typing import Any

import pytest

from lb.ipvs import DEFAULT_TIMEOUTS, Timeouts
from lb.select import Probes, SelectError, choose
from lb.userspace import ProxySettings, UserspaceBackend

SETTINGS = ProxySettings()


class FakeKernelBackend:
    def __init__(self, name: str, **kwargs: Any) -> None:
        self.name = name
        self.kwargs = kwargs


def modules(*present: str) -> Any:
    def import_module(name: str) -> types.ModuleType:
        if name not in present:
            raise ModuleNotFoundError(f"No module named {name!r}")
        module = types.ModuleType(name)
        module.IpvsBackend = lambda **kw: FakeKernelBackend("ipvs", **kw)  # type: ignore[attr-defined]
        module.NftablesBackend = lambda **kw: FakeKernelBackend("nftables", **kw)  # type: ignore[attr-defined]
        module.DEFAULT_TIMEOUTS = DEFAULT_TIMEOUTS  # type: ignore[attr-defined]
        return module

    return import_module


def probes(
    *,
    ip_vs: bool = False,
    net_admin: bool = True,
    nft: bool = True,
    present: tuple[str, ...] = ("lb.ipvs", "lb.nft"),
    rules: tuple[dict[str, Any] | None, list[str]] = ({}, []),
) -> Probes:
    return Probes(
        has_ip_vs=lambda: ip_vs,
        net_admin=lambda: net_admin,
        nft_works=lambda: nft,
        import_module=modules(*present),
        mark_rules=lambda: rules,
    )


def test_auto_prefers_ipvs_then_nftables_then_userspace() -> None:
    assert choose("auto", SETTINGS, probes(ip_vs=True)).backend.name == "ipvs"
    idle = choose("ipvs", ProxySettings(tcp_idle_timeout=86400), probes(ip_vs=True)).backend
    assert idle.kwargs == {
        "timeouts": Timeouts(
            tcp=86400,
            tcp_fin=DEFAULT_TIMEOUTS.tcp_fin,  # type: ignore[attr-defined]
            udp=DEFAULT_TIMEOUTS.udp,
        )
    }
    chosen = choose("auto", SETTINGS, probes())
    assert chosen.backend.name == "nftables"
    assert chosen.backend.kwargs == {  # type: ignore[attr-defined]
        "table": "meshplane",
        "masquerade_mark": 0x1000,
    }
    fallback = choose("auto", SETTINGS, probes(net_admin=False))
    assert isinstance(fallback.backend, UserspaceBackend)
    assert fallback.reason == "ipvs, nftables: no CAP_NET_ADMIN"
    # Without the capability, a loaded ip_vs is passed over too (netlink would refuse).
    assert isinstance(
        choose("auto", SETTINGS, probes(ip_vs=True, net_admin=False)).backend, UserspaceBackend
    )


def test_auto_passes_over_a_backend_missing_from_the_build_and_says_so() -> None:
    chosen = choose("auto", SETTINGS, probes(ip_vs=True, present=()))
    assert isinstance(chosen.backend, UserspaceBackend)
    assert "lb.ipvs is not part of this build" in chosen.reason
    assert "lb.nft is not part of this build" in chosen.reason
    assert choose("auto", SETTINGS, probes(nft=False)).reason.endswith(
        "nftables: `nft list tables` fails"
    )


def test_asking_by_name_fails_clearly_when_it_cannot_run() -> None:
    with pytest.raises(SelectError, match=r"lb\.nft is not part of this build"):
        choose("nftables", SETTINGS, probes(present=()))
    with pytest.raises(SelectError, match="no ip_vs"):
        choose("ipvs", SETTINGS, probes(ip_vs=False))
    with pytest.raises(SelectError, match="nft list tables"):
        choose("nftables", SETTINGS, probes(nft=False))
    for kernel in ("ipvs", "nftables"):
        with pytest.raises(SelectError, match=f"--lb {kernel}: the agent lacks CAP_NET_ADMIN"):
            choose(kernel, SETTINGS, probes(ip_vs=True, net_admin=False))
    with pytest.raises(SelectError, match="choose auto"):
        choose("magic", SETTINGS, probes())


def test_userspace_gets_the_publish_address() -> None:
    settings = ProxySettings(publish_address="127.0.0.5")
    chosen = choose("userspace", settings, probes(ip_vs=True))
    assert isinstance(chosen.backend, UserspaceBackend)
    assert chosen.backend.settings.publish_address == "127.0.0.5"


KUBE_PROXY_MASQ = {
    "nftables": [
        {"metainfo": {"version": "1.0.6"}},
        {
            "rule": {
                "family": "ip",
                "table": "nat",
                "chain": "KUBE-POSTROUTING",
                "handle": 7,
                "expr": [
                    {
                        "match": {
                            "op": "==",
                            "left": {"&": [{"meta": {"key": "mark"}}, 0x4000]},
                            "right": 0x4000,
                        }
                    },
                    {"masquerade": None},
                ],
            }
        },
    ]
}


def test_fwmark_is_passed_on_and_a_clash_with_another_rule_refuses_the_start() -> None:
    chosen = choose("nftables", SETTINGS, probes(), fwmark=0x40)
    assert chosen.backend.kwargs["masquerade_mark"] == 0x40  # type: ignore[attr-defined]
    # kube-proxy's masquerade bit is taken: refused, naming the rule
    with pytest.raises(SelectError, match=r"--fwmark 0x4000: .*KUBE-POSTROUTING.*--fwmark"):
        choose("nftables", SETTINGS, probes(rules=(KUBE_PROXY_MASQ, [])), fwmark=0x4000)
    # ... as under auto, which then passes over nftables with the reason
    fallback = choose("auto", SETTINGS, probes(rules=(KUBE_PROXY_MASQ, [])), fwmark=0x4000)
    assert isinstance(fallback.backend, UserspaceBackend)
    assert "--fwmark 0x4000" in fallback.reason
    # the default bit is not kube-proxy's
    assert choose("nftables", SETTINGS, probes(rules=(KUBE_PROXY_MASQ, []))).backend
    saved = ["*mangle", "-A PREROUTING -p tcp --dport 80 -j MARK --set-xmark 0x1000/0x1000"]
    with pytest.raises(SelectError, match=r"iptables -t mangle -A PREROUTING"):
        choose("nftables", SETTINGS, probes(rules=(None, saved)))
