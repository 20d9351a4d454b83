"""Reading the backend's table back: `nft -j list table` output into a `Layout`.

The JSON shapes are those nft 1.0.6 prints for the objects `layout.py` makes:
map elements as `[key, value]` pairs, concatenations as `{"concat": [...]}`,
verdicts as `{"goto": {"target": ...}}`. Anything else (a foreign element, a
half-present service) is reported, not trusted: `Listing` says what to repair.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lb.nft.base import DEFAULT_MASQUERADE_MARK
from lb.nft.layout import (
    ENDPOINTS_SET,
    PUBLISHED_MAP,
    VIPS_MAP,
    Endpoint,
    Layout,
    ServiceLayout,
    chain_name,
    counter_name,
    parse_options_comment,
    slots_map,
    weights_map,
)
from lb.table import ANY_ADDRESS, Real, Scheduler, ServiceOptions, VirtualKey


def _elements(obj: Mapping[str, Any], *, sets: bool = False) -> Iterable[tuple[Any, Any]]:
    """A map's (key, value) pairs; a set's (key, None)."""
    for item in obj.get("elem", []) or []:
        if sets:
            if isinstance(item, dict) and "elem" in item:
                item = item["elem"].get("val")
            yield item, None
        elif isinstance(item, list) and len(item) == 2:
            key, value = item
            if isinstance(key, dict) and "elem" in key:  # an element with options
                key = key["elem"].get("val")
            yield key, value


def _concat(value: Any) -> list[Any] | None:
    if isinstance(value, dict) and isinstance(value.get("concat"), list):
        return list(value["concat"])
    return None


def _real(value: Any) -> Real | None:
    parts = _concat(value)
    if parts is None or len(parts) != 2:
        return None
    address, port = parts
    if not isinstance(address, str) or not isinstance(port, int):
        return None
    return Real(address, port)


def _goto(value: Any) -> str | None:
    if isinstance(value, dict):
        for verdict in ("goto", "jump"):
            target = value.get(verdict)
            if isinstance(target, dict) and isinstance(target.get("target"), str):
                return str(target["target"])
    return None


@dataclass
class Listing:
    """What `parse_listing` found: the layout, and what in it needs work."""

    layout: Layout
    #: Services whose slots or rule disagree with their weights: rewrite their slots.
    repair: set[VirtualKey] = field(default_factory=set)
    #: Dispatch elements whose service pieces are missing: remove what is left of them.
    broken: dict[VirtualKey, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    #: Elements of the `endpoints` set that disagree with the services' reals.
    endpoints_missing: set[Endpoint] = field(default_factory=set)
    endpoints_extra: set[Endpoint] = field(default_factory=set)

    def endpoint_fixes(self) -> list[str]:
        t = self.layout.table
        return [
            *(
                f"delete element ip {t} {ENDPOINTS_SET} {{ {a} . {p} . {n} }}"
                for a, p, n in sorted(self.endpoints_extra)
            ),
            *(
                f"add element ip {t} {ENDPOINTS_SET} {{ {a} . {p} . {n} }}"
                for a, p, n in sorted(self.endpoints_missing)
            ),
        ]


def parse_listing(
    table: str, listing: Mapping[str, Any], *, mark: int = DEFAULT_MASQUERADE_MARK
) -> Listing:
    """The Layout in `nft -j list table ip <table>` output, and what looked wrong in it."""
    maps: dict[str, Mapping[str, Any]] = {}
    rules: dict[str, list[Mapping[str, Any]]] = {}
    counters: set[str] = set()
    for item in listing.get("nftables", []):
        if not isinstance(item, dict):
            continue
        if "map" in item and item["map"].get("table") == table:
            maps[item["map"]["name"]] = item["map"]
        elif "set" in item and item["set"].get("table") == table:
            maps[item["set"]["name"]] = item["set"]
        elif "counter" in item and item["counter"].get("table") == table:
            counters.add(str(item["counter"].get("name")))
        elif "rule" in item and item["rule"].get("table") == table:
            rules.setdefault(item["rule"].get("chain", ""), []).append(item["rule"])
    found = Listing(Layout(table, mark=mark))
    keys: dict[VirtualKey, str] = {}
    for name, width in ((VIPS_MAP, 3), (PUBLISHED_MAP, 2)):
        for raw, target in _elements(maps.get(name, {})):
            parts = _concat(raw)
            chain = _goto(target)
            if parts is None or len(parts) != width or chain is None:
                found.problems.append(f"unreadable element in {name}: {raw!r}")
                continue
            address, protocol, port = parts if width == 3 else [ANY_ADDRESS, *parts]
            if protocol in ("tcp", "udp") and isinstance(address, str) and isinstance(port, int):
                keys[VirtualKey(protocol, address, port)] = chain
            else:
                found.problems.append(f"unreadable element in {name}: {raw!r}")
    for key, chain in keys.items():
        if chain != chain_name(key) or slots_map(key) not in maps or weights_map(key) not in maps:
            found.problems.append(f"{key}: pieces missing or misnamed ({chain}); removed")
            found.broken[key] = chain
            continue
        options = None
        for rule in rules.get(chain, []):
            options = parse_options_comment(str(rule.get("comment", ""))) or options
        if options is not None and options.scheduler == Scheduler.LEAST_CONNECTIONS:
            # An older version ran lc as rr here; now refused: the reconcile puts it
            # again and reports the error, rather than keep the silent round robin.
            found.problems.append(f"{key}: lc, which nftables cannot do; removed")
            found.broken[key] = chain
            continue
        layout = ServiceLayout(key, options or ServiceOptions())
        for raw, weight in _elements(maps[weights_map(key)]):
            real = _real(raw)
            if real is not None and isinstance(weight, int):
                layout.weights[real] = weight
        layout.recount()
        by_index: dict[int, Real] = {}
        for index, raw in _elements(maps[slots_map(key)]):
            real = _real(raw)
            if isinstance(index, int) and real is not None:
                by_index[index] = real
        layout.slots = [by_index[i] for i in range(len(by_index)) if i in by_index]
        layout.reindex()
        modulus = _modulus(rules.get(chain, []))
        if (
            options is None
            or len(layout.slots) != len(by_index)
            or modulus != (len(layout.slots) or None)
            or not layout.consistent()
            or not _counts(rules.get(chain, []), counter_name(key), counters)
        ):
            found.problems.append(f"{key}: rule or slots do not match the weights; repaired")
            found.repair.add(key)
        found.layout.services[key] = layout
    found.layout.count_endpoints()
    present: set[Endpoint] = set()
    for raw, _ in _elements(maps.get(ENDPOINTS_SET, {}), sets=True):
        parts = _concat(raw)
        if parts is not None and len(parts) == 3:
            present.add((parts[0], parts[1], parts[2]))
    found.endpoints_missing = found.layout.endpoints.keys() - present
    found.endpoints_extra = present - found.layout.endpoints.keys()
    return found


def _counts(rules: list[Mapping[str, Any]], name: str, counters: set[str]) -> bool:
    """Whether the service chain's rule bumps its named counter (a table of an older
    version has neither): else `repair` makes the counter and rewrites the rule."""
    if name not in counters:
        return False
    return any(
        isinstance(expr, dict) and expr.get("counter") == name
        for rule in rules
        for expr in rule.get("expr", [])
    )


def parse_counters(listing: Mapping[str, Any]) -> dict[str, int]:
    """`nft -j list counters table ...`: each named counter's packets."""
    found: dict[str, int] = {}
    for item in listing.get("nftables", []):
        counter = item.get("counter") if isinstance(item, dict) else None
        if isinstance(counter, dict) and isinstance(counter.get("packets"), int):
            found[str(counter.get("name"))] = counter["packets"]
    return found


def _modulus(rules: list[Mapping[str, Any]]) -> int | None:
    """The `mod N` of a service chain's balancing rule (None for a reject rule).

    That rule is the last one: with affinity, the rules before it DNAT the
    clients the affinity sets hold (`lb/nft/layout.py`).
    The hash is `numgen inc`, or `jhash` (Maglev).
    """
    if not rules:
        return -1
    for expr in rules[-1].get("expr", []):
        dnat = expr.get("dnat") if isinstance(expr, dict) else None
        if isinstance(dnat, dict):
            addr = dnat.get("addr")
            if isinstance(addr, dict) and "map" in addr:
                key = addr["map"].get("key", {})
                hashed = key.get("numgen") or key.get("jhash") or {}
                mod = hashed.get("mod") if isinstance(hashed, dict) else None
                return int(mod) if isinstance(mod, int) else -1
            return -1
    return None
