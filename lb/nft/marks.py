"""The nftables backend's packet-mark bit (`--fwmark`) and the check for clashes at start.

The backend's service chains set one bit of the packet mark on a flow's first
packet and its postrouting rule masquerades the packets that carry it (lb/nft/base.py).
Other software marks packets too: kube-proxy uses 0x4000 (masquerade) and 0x8000
(drop), Swarm sets whole small marks for its IPVS services, Calico owns
0xffff0000, Cilium 0x0f00, Tailscale 0xff0000, and 0x2000 (the bit this backend
used first) is taken by several. A rule of theirs that tests or sets our bit
would masquerade, drop or unmark flows that are not theirs. So at start the
agent reads the ruleset (`nft -j list ruleset`, which shows iptables-nft rules
too, and `iptables-save` where the legacy iptables is in use) and refuses to
start when a rule outside its own tables touches the bit, naming the rule.

Sans-IO: the shell (lb/select.py) runs the commands and passes their output.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

#: The default bit: not one that kube-proxy, Calico, Cilium, Tailscale, Istio or
#: Weave use, nor 0x2000.
DEFAULT_FWMARK = 0x1000

#: Our own tables (the node's, the IPVS backend's, the sandboxes'): never a clash.
OWN_TABLE_PREFIX = "meshplane"


def check_fwmark(mark: int) -> int:
    """`mark` if it is a single bit of a 32-bit mark, else ValueError."""
    if not 0 < mark < 2**32 or mark & (mark - 1):
        raise ValueError(f"fwmark {mark:#x} must be one bit of a 32-bit mark (e.g. 0x1000)")
    return mark


def parse_fwmark(text: str) -> int:
    """A mark as given on the command line: 0x1000, 4096."""
    try:
        value = int(text.strip(), 0)
    except ValueError:
        raise ValueError(f"fwmark {text!r}: give a number such as 0x1000") from None
    return check_fwmark(value)


def _mentions_mark(node: Any) -> bool:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("meta", "ct") and isinstance(value, dict) and value.get("key") == "mark":
                return True
            if _mentions_mark(value):
                return True
    elif isinstance(node, list):
        return any(_mentions_mark(item) for item in node)
    return False


def _integers(node: Any) -> Iterator[int]:
    if isinstance(node, bool):
        return
    if isinstance(node, int):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _integers(value)
    elif isinstance(node, list):
        for item in node:
            yield from _integers(item)


def nft_clashes(ruleset: Mapping[str, Any], mark: int) -> list[str]:
    """Rules (outside our own tables) that test or set a mark with our bit in it.

    A statement is read as far as it is readable: any statement that names the
    packet or conntrack mark and carries an integer with the bit (a value or a
    mask) counts. A rule that sets the whole mark from a map or a variable cannot
    be read that way and is not counted.
    """
    found: list[str] = []
    for item in ruleset.get("nftables", []):
        rule = item.get("rule") if isinstance(item, dict) else None
        if not isinstance(rule, dict):
            continue
        table = str(rule.get("table", ""))
        if table.startswith(OWN_TABLE_PREFIX):
            continue
        for statement in rule.get("expr", []):
            if _mentions_mark(statement) and any(v & mark for v in _integers(statement)):
                found.append(
                    f"nft {rule.get('family', '?')} table {table} chain {rule.get('chain', '?')}"
                    f" (handle {rule.get('handle', '?')})"
                )
                break
    return found


_IPTABLES_MARK = re.compile(
    r"--(?:set-xmark|set-mark|or-mark|xor-mark|and-mark|mark)\s+(0x[0-9a-fA-F]+|\d+)"
    r"(?:/(0x[0-9a-fA-F]+|\d+))?"
)


def iptables_clashes(saved: Iterable[str], mark: int) -> list[str]:
    """Lines of `iptables-save` whose mark match or target touches our bit."""
    found: list[str] = []
    table = "?"
    for line in saved:
        line = line.strip()
        if line.startswith("*"):
            table = line[1:]
            continue
        if not line.startswith("-A "):
            continue
        for value, mask in _IPTABLES_MARK.findall(line):
            bits = int(value, 0) | (int(mask, 0) if mask else 0)
            if bits & mark:
                found.append(f"iptables -t {table} {line}")
                break
    return found
