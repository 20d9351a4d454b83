"""The node's nftables table of encrypted overlays (`inet meshplane_esp`): per-VNI encryption.

The xfrm policies of `mesh.sandbox.esp` select UDP to the data-path port between
two VTEPs *with a firewall mark*; this table decides which VXLAN packets carry
it, by their VNI (bits 96-119 of the transport header: UDP 8 bytes, then the
VXLAN flags and reserved 4), as libnetwork does with its iptables `u32` match:

- `out` (route hook output, mangle): a VXLAN packet of an encrypted network's
  VNI gets the mark `esp.MARK` in the bits `esp.MARK_MASK` (others' bits kept);
  a changed mark makes the kernel route the packet again, and that routing
  meets the marked outbound policy and its ESP SA. A plain network's VXLAN
  stays unmarked and leaves as VXLAN;
- `post` (postrouting): a marked VXLAN packet whose route is no IPsec bundle
  (`rt ipsec missing`: no policy matched, e.g. while the SAs cannot be
  programmed) is dropped and counted (`plain_out_dropped`), so an encrypted
  network never sends clear text, even before or without its IPsec;
- `in` (input): VXLAN of an encrypted network's VNI that did not come out of an
  ESP SA (`meta ipsec missing`) is dropped and counted (`plain_in_dropped`);
  the decrypted packet of an ESP SA passes, as does a plain network's VXLAN.

The counters are named objects that a rewrite keeps (the chains are flushed
and filled again in one `nft -f` transaction); the table goes when the last
encrypted network goes (`remove`). Runs in the node's namespace (a path; None:
the calling thread's own).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Collection
from typing import Any

from mesh.core.netns import entered
from mesh.sandbox import esp
from mesh.sandbox.names import ESP_TABLE

NFT_TIMEOUT = 30.0
TABLE = f"inet {ESP_TABLE}"
COUNTERS = ("plain_out_dropped", "plain_in_dropped")


class FilterError(RuntimeError):
    """nft refused (or could not run); the message has its words."""


def render(vnis: Collection[int], port: int) -> str:
    """The `nft -f` script that makes the table mark and guard exactly `vnis`
    (pure text: unit-tested without a kernel). No VNIs: the script removes it."""
    if not vnis:
        return f"table {TABLE} {{}}\ndelete table {TABLE}\n"
    wanted = ", ".join(str(vni) for vni in sorted(set(vnis)))
    vxlan = f"udp dport {port} @th,96,24 {{ {wanted} }}"
    keep = ~esp.MARK_MASK & 0xFFFFFFFF
    lines = [
        f"table {TABLE} {{}}",
        *(f"add counter {TABLE} {name}" for name in COUNTERS),
        f"add chain {TABLE} out {{ type route hook output priority mangle; policy accept; }}",
        f"add chain {TABLE} post {{ type filter hook postrouting priority filter; "
        "policy accept; }",
        f"add chain {TABLE} in {{ type filter hook input priority filter; policy accept; }}",
        *(f"flush chain {TABLE} {chain}" for chain in ("out", "post", "in")),
        f"add rule {TABLE} out {vxlan} meta mark set meta mark & 0x{keep:08x} | 0x{esp.MARK:08x}",
        f"add rule {TABLE} post meta mark & 0x{esp.MARK_MASK:08x} == 0x{esp.MARK:08x} "
        f'udp dport {port} rt ipsec missing counter name "plain_out_dropped" drop',
        f'add rule {TABLE} in {vxlan} meta ipsec missing counter name "plain_in_dropped" drop',
    ]
    return "\n".join(lines) + "\n"


def _nft(argv: list[str], stdin: str | None = None) -> str:
    try:
        done = subprocess.run(
            ["nft", *argv],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=NFT_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise FilterError(f"nft: {error}") from error
    if done.returncode != 0:
        raise FilterError(f"nft {' '.join(argv)} failed: {done.stderr.strip()}")
    return done.stdout


def _in(node_netns: str | None) -> contextlib.AbstractContextManager[None]:
    return entered(node_netns) if node_netns else contextlib.nullcontext()


def apply(vnis: Collection[int], port: int, node_netns: str | None = None) -> None:
    """Make the table mark and guard exactly `vnis` (none: remove it). Idempotent."""
    with _in(node_netns):
        _nft(["-f", "-"], render(vnis, port))


def remove(node_netns: str | None = None) -> None:
    apply((), esp.DEFAULT_PORT, node_netns)


def parse_counters(text: str) -> dict[str, int]:
    """Packets per counter of the table, from `nft -j list counters table ...`."""
    found = dict.fromkeys(COUNTERS, 0)
    document: Any = json.loads(text or "{}")
    for item in document.get("nftables", []):
        counter = item.get("counter") if isinstance(item, dict) else None
        if isinstance(counter, dict) and counter.get("name") in found:
            found[counter["name"]] = int(counter.get("packets", 0))
    return found


def counters(node_netns: str | None = None) -> dict[str, int]:
    """The table's drop counters (all 0 when it does not exist)."""
    with _in(node_netns):
        try:
            return parse_counters(_nft(["-j", "list", "counters", "table", TABLE]))
        except FilterError:
            return dict.fromkeys(COUNTERS, 0)
