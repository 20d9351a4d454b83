"""Which L4 backend this node runs: `--lb auto|ipvs|nftables|userspace` (docs/design.md).

`auto` takes `ipvs` where the kernel has ip_vs, else `nftables` where `nft`
works, each only when the agent holds CAP_NET_ADMIN (root, or a service user
given the capability: `mesh.core.capabilities`), else `userspace`, and says why
in `Choice.reason`
(the agent logs it at start). The kernel backends live in `lb.ipvs` and
`lb.nft`, imported only when chosen: a build without one of them still runs,
`auto` passes over it with the reason, and asking for it by name is a clear
error (`SelectError`).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from lb.backend import Backend
from lb.sysctls import LEDGER_NAME, SysctlLedger
from lb.userspace import ProxySettings, UserspaceBackend
from mesh.core.capabilities import effective

IP_VS_PROC = Path("/proc/net/ip_vs")
NFT_TABLE = "meshplane"


class SelectError(Exception):
    """The backend asked for cannot run here (the message says why)."""


def kernel_has_ip_vs() -> bool:
    """Whether IPVS is usable: loaded already, or loadable by modprobe (root only)."""
    if IP_VS_PROC.exists():
        return True
    if os.geteuid() != 0 or shutil.which("modprobe") is None:
        return False
    try:
        subprocess.run(["modprobe", "-q", "ip_vs"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return IP_VS_PROC.exists()


def nft_works() -> bool:
    """Whether `nft` runs and may read the ruleset (root, or CAP_NET_ADMIN)."""
    if shutil.which("nft") is None:
        return False
    try:
        done = subprocess.run(
            ["nft", "list", "tables"], capture_output=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def mark_rules() -> tuple[dict[str, Any] | None, list[str]]:
    """The host's ruleset as `nft -j list ruleset` gives it (None: unreadable) and the
    lines of the legacy `iptables-save` (empty where it is missing or unreadable)."""
    ruleset: dict[str, Any] | None = None
    saved: list[str] = []
    try:
        done = subprocess.run(
            ["nft", "-j", "list", "ruleset"], capture_output=True, timeout=10, check=False
        )
        if done.returncode == 0:
            ruleset = json.loads(done.stdout or b"{}")
    except (OSError, subprocess.SubprocessError, ValueError):
        ruleset = None
    for tool in ("iptables-legacy-save", "iptables-save"):
        if shutil.which(tool) is None:
            continue
        try:
            done = subprocess.run([tool], capture_output=True, timeout=10, check=False)
        except (OSError, subprocess.SubprocessError):
            continue
        if done.returncode == 0:
            saved += done.stdout.decode(errors="replace").splitlines()
        break
    return ruleset, saved


@dataclass(frozen=True, slots=True)
class Probes:
    """What `choose` asks of the machine; tests give their own answers."""

    has_ip_vs: Callable[[], bool] = kernel_has_ip_vs
    #: CAP_NET_ADMIN in the effective set: both kernel backends need it (netlink, nft)
    net_admin: Callable[[], bool] = field(default=lambda: effective().net_admin)
    nft_works: Callable[[], bool] = nft_works
    import_module: Callable[[str], ModuleType] = importlib.import_module
    #: the rules other software has on the host: `--fwmark`'s clash check
    mark_rules: Callable[[], tuple[dict[str, Any] | None, list[str]]] = mark_rules


@dataclass(frozen=True, slots=True)
class Choice:
    backend: Backend
    reason: str


def _load(module: str, probes: Probes) -> ModuleType:
    try:
        return probes.import_module(module)
    except ImportError as exc:
        raise SelectError(f"{module} is not part of this build ({exc})") from None


def _ipvs(probes: Probes, settings: ProxySettings, data_dir: Path | None) -> Backend:
    ipvs = _load("lb.ipvs", probes)
    # The proxy's idle timeout is IPVS's tcp timeout (`--lb-tcp-idle`): one setting for both.
    timeouts = dataclasses.replace(ipvs.DEFAULT_TIMEOUTS, tcp=int(settings.tcp_idle_timeout))
    if data_dir is None:
        backend: Backend = ipvs.IpvsBackend(timeouts=timeouts)
    else:  # the sysctls' previous values, recorded where a kill -9 keeps them
        ledger = SysctlLedger(data_dir / LEDGER_NAME)
        backend = ipvs.IpvsBackend(timeouts=timeouts, sysctls=ledger)
    return backend


def _nftables(probes: Probes, fwmark: int | None) -> Backend:
    nft = _load("lb.nft", probes)
    marks = importlib.import_module("lb.nft.marks")  # sans-IO: there whenever lb.nft is
    mark: int = marks.DEFAULT_FWMARK if fwmark is None else marks.check_fwmark(fwmark)
    ruleset, saved = probes.mark_rules()
    clashes: list[str] = marks.nft_clashes(ruleset or {}, mark) + marks.iptables_clashes(
        saved, mark
    )
    if clashes:
        raise SelectError(
            f"--fwmark {mark:#x}: other rules on this host use that mark bit ("
            + "; ".join(clashes[:3])
            + (f"; {len(clashes) - 3} more" if len(clashes) > 3 else "")
            + "): choose a bit they leave alone with --fwmark"
        )
    backend: Backend = nft.NftablesBackend(table=NFT_TABLE, masquerade_mark=mark)
    return backend


def choose(
    requested: str,
    settings: ProxySettings,
    probes: Probes | None = None,
    *,
    fwmark: int | None = None,
    data_dir: Path | None = None,
) -> Choice:
    """The backend for `--lb requested`; `fwmark`: the nftables backend's mark bit
    (None: its default), refused when other rules on the host use it; `data_dir`:
    where the IPVS backend records the sysctls' values it changes (lb/sysctls.py)."""
    probes = probes or Probes()
    if requested == "userspace":
        return Choice(UserspaceBackend(settings), "asked for (--lb userspace)")
    if requested in ("ipvs", "nftables") and not probes.net_admin():
        raise SelectError(
            f"--lb {requested}: the agent lacks CAP_NET_ADMIN (run it as root, or give it "
            "the capability: AmbientCapabilities=CAP_NET_ADMIN), or choose --lb userspace"
        )
    if requested == "ipvs":
        if not probes.has_ip_vs():
            raise SelectError(
                "--lb ipvs: this kernel has no ip_vs (no /proc/net/ip_vs, and "
                "modprobe ip_vs did not load it)"
            )
        return Choice(_ipvs(probes, settings, data_dir), "asked for (--lb ipvs)")
    if requested == "nftables":
        if not probes.nft_works():
            raise SelectError(
                "--lb nftables: `nft list tables` fails here (is nft installed, "
                "and does the agent run as root?)"
            )
        return Choice(_nftables(probes, fwmark), "asked for (--lb nftables)")
    if requested != "auto":
        raise SelectError(f"--lb {requested!r}: choose auto, ipvs, nftables or userspace")
    passed: list[str] = []
    if not probes.net_admin():
        reason = "ipvs, nftables: no CAP_NET_ADMIN"
        return Choice(UserspaceBackend(settings), reason)
    if probes.has_ip_vs():
        try:
            return Choice(_ipvs(probes, settings, data_dir), "the kernel has ip_vs")
        except SelectError as exc:
            passed.append(f"ipvs: {exc}")
    else:
        passed.append("ipvs: the kernel has no ip_vs")
    if not probes.nft_works():
        passed.append("nftables: `nft list tables` fails")
    else:
        try:
            return Choice(_nftables(probes, fwmark), "no ip_vs; CAP_NET_ADMIN and nft works")
        except SelectError as exc:
            passed.append(f"nftables: {exc}")
    return Choice(UserspaceBackend(settings), "; ".join(passed))
