"""The nftables backend's sans-IO core: the commands an op becomes, and what they cost.

`FakeMaps` executes the element and rule commands the way the kernel treats
them (adding a key that exists or deleting one that does not fails the whole
transaction), so these tests check that the commands keep the kernel's maps
equal to the mirror, for any sequence of ops, and that one change costs a
constant number of commands whatever the size of the service. The kernel
itself runs the same commands in tests/lb/test_nft_backend.py.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb import maglev
from lb.nft.base import DEFAULT_MASQUERADE_MARK, base_commands
from lb.nft.layout import (
    HASH_SEED,
    MAX_WEIGHT,
    Layout,
    LayoutError,
    affinity_set,
    chain_name,
    counter_name,
    parse_options_comment,
    slots_map,
    weights_map,
)
from lb.nft.listing import parse_counters, parse_listing
from lb.nft.slots import MAX_SLOTS
from lb.table import (
    ANY_ADDRESS,
    DeleteReal,
    DeleteService,
    Op,
    PutReal,
    PutService,
    Real,
    Scheduler,
    ServiceOptions,
    VirtualKey,
    apply_ops,
)

ELEMENTS = re.compile(r"^(add|delete) element ip \w+ (\w+) \{ (.*) \}$")
RULE = re.compile(r"^add rule ip \w+ (\w+) (.*) comment \"(.*)\"$")


class FakeMaps:
    """Maps and service rules as the kernel would hold them after the commands."""

    def __init__(self) -> None:
        self.maps: dict[str, dict[str, str]] = {"endpoints": {}}
        self.rules: dict[str, list[str]] = {}
        self.counters: set[str] = set()
        self.sets: set[str] = set()

    def run(self, commands: list[str]) -> None:
        for command in commands:
            if command.startswith("add counter"):
                self.counters.add(command.split()[4])
            elif command.startswith("delete counter"):
                name = command.split()[4]
                assert not any(name in " ".join(r) for r in self.rules.values()), "in use"
                self.counters.remove(name)
            elif command.startswith("add set"):
                self.sets.add(command.split()[4])
            elif command.startswith("delete set"):
                name = command.split()[4]
                assert not any(f"@{name} " in " ".join(r) for r in self.rules.values()), "in use"
                self.sets.remove(name)
            elif command.startswith("add map"):
                self.maps.setdefault(command.split()[4], {})
            elif command.startswith("delete map"):
                name = command.split()[4]
                assert not any(f"@{name} " in " ".join(r) for r in self.rules.values()), "in use"
                del self.maps[name]
            elif command.startswith("flush map"):
                self.maps[command.split()[4]].clear()
            elif command.startswith("flush chain") or command.startswith("delete chain"):
                self.rules.pop(command.split()[4], None)
            elif match := RULE.match(command):
                rules = self.rules.setdefault(match[1], [])
                named = re.search(r"counter name (\w+)", match[2])
                assert named and named[1] in self.counters, f"{match[1]}: no counter"
                for used in re.findall(r"@(\w+)", match[2]):
                    assert used in self.maps or used in self.sets, f"{match[1]}: no {used}"
                rules.append(match[2])
            elif match := ELEMENTS.match(command):
                verb, name, body = match.groups()
                if name in ("vips", "published"):
                    continue
                target = self.maps[name]
                for item in body.split(", "):
                    key, _, value = item.partition(" : ")
                    if verb == "add":
                        assert key not in target, f"{name}: {key} exists"
                        target[key] = value
                    else:
                        assert key in target, f"{name}: no {key} to delete"
                        del target[key]
            elif command.startswith("add chain"):
                pass
            else:
                raise AssertionError(f"unexpected command {command!r}")

    def check(self, layout: Layout) -> None:
        assert set(self.maps["endpoints"]) == {f"{a} . {p} . {n}" for a, p, n in layout.endpoints}
        for key, service in layout.services.items():
            slots = self.maps[slots_map(key)]
            assert slots == {str(i): f"{r.address} . {r.port}" for i, r in enumerate(service.slots)}
            weights = self.maps[weights_map(key)]
            assert weights == {
                f"{r.address} . {r.port}": str(w) for r, w in service.weights.items()
            }
            rules = self.rules[f"svc_{slots_map(key)[len('slots_') :]}"]
            rule = rules[-1]
            affinity = service.options.affinity
            if service.slots:
                pick = (
                    "jhash ip saddr . tcp sport"
                    if service.options.scheduler == "mh"
                    else ("numgen inc")
                )
                assert f"{pick} mod {len(service.slots)} " in rule
                ready = sorted(r for r, w in service.weights.items() if w > 0)
                # with affinity: per ready real, "kept" and "new" rules, then the balancing one
                assert len(rules) == (2 * len(ready) + 1 if affinity else 1)
                for index, real in enumerate(ready if affinity else ()):
                    name = affinity_set(key, real)
                    assert (
                        f"ip saddr @{name} update @{name} {{ ip saddr timeout {affinity}s }}"
                        in (rules[index])
                    )
                    assert rules[len(ready) + index].startswith("meta l4proto tcp jhash ip saddr")
            else:
                assert rules == [f"counter name {counter_name(key)} reject"]
            assert service.consistent()
        assert self.counters == {counter_name(key) for key in layout.services}
        assert self.sets == {
            affinity_set(key, real)
            for key, service in layout.services.items()
            if service.options.affinity
            for real, weight in service.weights.items()
            if weight > 0
        }


def run(layout: Layout, kernel: FakeMaps, ops: list[Op]) -> int:
    """Plan and run `ops`; the number of commands they took."""
    count = 0
    for op in ops:
        commands, _ = layout.plan(op)
        kernel.run(commands)
        count += len(commands)
    kernel.check(layout)
    return count


KEY = VirtualKey("tcp", "10.0.0.1", 80)
KEY2 = VirtualKey("tcp", ANY_ADDRESS, 30080)  # shares reals with KEY: endpoints are counted
WRR = ServiceOptions(Scheduler.WEIGHTED_ROUND_ROBIN)
MAGLEV = ServiceOptions(Scheduler.MAGLEV, affinity=0)
AFFINE = ServiceOptions(Scheduler.ROUND_ROBIN, affinity=300)


def real(i: int) -> Real:
    return Real(f"10.1.{i // 250}.{i % 250 + 1}", 8080)


def test_wrr_gives_a_real_as_many_slots_as_its_weight_rr_one() -> None:
    layout, kernel = Layout("t"), FakeMaps()
    run(layout, kernel, [PutService(KEY, WRR), PutReal(KEY, real(1), 3), PutReal(KEY, real(2), 1)])
    assert sorted(layout.services[KEY].slots) == [real(1)] * 3 + [real(2)]
    run(layout, kernel, [PutService(KEY)])  # rr ignores weights, as IPVS's does
    assert sorted(layout.services[KEY].slots) == [real(1), real(2)]


def test_weight_zero_keeps_the_real_without_a_slot_and_removal_flushes_it() -> None:
    layout, kernel = Layout("t"), FakeMaps()
    run(layout, kernel, [PutService(KEY), PutReal(KEY, real(1), 1), PutReal(KEY, real(2), 1)])
    run(layout, kernel, [PutReal(KEY, real(1), 0)])
    assert layout.services[KEY].slots == [real(2)]
    assert layout.to_table()[KEY].reals == {real(1): 0, real(2): 1}
    assert layout.plan(PutReal(KEY, real(1), 0)) == ([], [])  # nothing changed: no command
    _, flushed = layout.plan(DeleteReal(KEY, real(1)))
    assert flushed == [(KEY, real(1))]
    _, flushed = layout.plan(DeleteService(KEY))
    assert flushed == [(KEY, real(2))]


@pytest.mark.parametrize(
    "op",
    [
        PutService(VirtualKey("sctp", "10.0.0.1", 80)),  # type: ignore[arg-type]
        PutService(VirtualKey("tcp", "10.0.0.256", 80)),
        PutService(VirtualKey("tcp", "10.0.0.1", 0)),
        PutService(VirtualKey("tcp", "10.0.0.1", 70000)),
        PutReal(KEY, Real("10.1.0.1", 80), 1),  # no such service
    ],
)
def test_bad_ops_are_refused_with_a_reason(op: Op) -> None:
    with pytest.raises(LayoutError):
        Layout("t").plan(op)


@pytest.mark.parametrize(
    ("target", "weight"),
    [
        (Real("0.0.0.0", 80), 1),
        (Real("10.1.0.1", 80), -1),
        (Real("10.1.0.1", 80), MAX_WEIGHT + 1),
        (Real("10.1.0.1; flush ruleset", 80), 1),
        (Real("10.1.0.1", 80), True),
    ],
)
def test_bad_reals_are_refused_before_reaching_nft(target: Real, weight: int) -> None:
    layout = Layout("t")
    layout.plan(PutService(KEY))
    with pytest.raises(LayoutError):
        layout.plan(PutReal(KEY, target, weight))


def change_costs(size: int) -> dict[str, int]:
    """Commands taken by single changes in a service of `size` reals."""
    layout, kernel = Layout("t"), FakeMaps()
    run(layout, kernel, [PutService(KEY), *(PutReal(KEY, real(i), 1) for i in range(size))])
    costs = {
        "add": run(layout, kernel, [PutReal(KEY, real(size), 1)]),
        "drain": run(layout, kernel, [PutReal(KEY, real(size // 2), 0)]),
        "undrain": run(layout, kernel, [PutReal(KEY, real(size // 2), 1)]),
        "remove first": run(layout, kernel, [DeleteReal(KEY, real(0))]),
        "remove middle": run(layout, kernel, [DeleteReal(KEY, real(size * 3 // 4))]),
    }
    assert len(layout.services[KEY].slots) == size - 1
    return costs


def test_one_change_among_ten_thousand_reals_costs_a_constant_number_of_commands() -> None:
    costs = change_costs(10_000)
    assert costs == change_costs(10), "the cost of a change grows with the service"
    # at most: the weight element (delete + add), two slot deletes and one add
    # (swap with last), the service's one rule (flush + add: its modulus changed)
    assert max(costs.values()) <= 7, costs


keys = st.sampled_from([KEY, KEY2])
ops_strategy = st.lists(
    st.one_of(
        st.builds(PutService, keys, st.sampled_from([ServiceOptions(), WRR, MAGLEV, AFFINE])),
        st.builds(PutReal, keys, st.builds(real, st.integers(0, 5)), st.integers(0, 4)),
        st.builds(DeleteReal, keys, st.builds(real, st.integers(0, 5))),
        st.builds(DeleteService, keys),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(ops_strategy)
def test_any_op_sequence_keeps_kernel_maps_equal_to_the_mirror(ops: list[Op]) -> None:
    layout, kernel, model = Layout("t"), FakeMaps(), {}  # type: ignore[var-annotated]
    for op in ops:
        if isinstance(op, PutReal) and op.key not in layout.services:
            with pytest.raises(LayoutError):
                layout.plan(op)
            continue
        run(layout, kernel, [op])
        apply_ops(model, [op])
        assert layout.to_table() == model


def test_options_survive_the_rule_comment() -> None:
    for options in (
        ServiceOptions(),
        WRR,
        ServiceOptions(Scheduler.WEIGHTED_ROUND_ROBIN, True),
        ServiceOptions(local=True),
    ):
        layout = Layout("t")
        commands, _ = layout.plan(PutService(KEY, options))
        comment = next(c for c in commands if "comment" in c).split('comment "')[1][:-1]
        assert parse_options_comment(comment) == options
    assert parse_options_comment("someone else's rule") is None
    # a rule written before traffic policies reads as cluster
    assert parse_options_comment("meshplane sched=rr proxy=0") == ServiceOptions()


def test_least_connections_is_refused_with_a_clear_error_not_run_as_rr() -> None:
    """nftables keeps no per-real connection count a rule can read: `lc` used to be
    programmed as round robin with a log line; now the op is refused, naming why."""
    layout = Layout("t")
    with pytest.raises(LayoutError, match="cannot balance by least connections"):
        layout.plan(PutService(KEY, ServiceOptions(Scheduler.LEAST_CONNECTIONS)))
    assert KEY not in layout.services
    # nor may an existing service switch to it
    layout.plan(PutService(KEY))
    with pytest.raises(LayoutError, match="least connections"):
        layout.plan(PutService(KEY, ServiceOptions(Scheduler.LEAST_CONNECTIONS)))
    assert layout.services[KEY].options == ServiceOptions()


def test_weights_up_to_1000_and_300_weighted_reals_keep_exact_or_capped_shares() -> None:
    """No 256 cap: weights 0..1000, the map reduced by the gcd (1:3 is four slots) or
    capped at MAX_SLOTS within one slot per real, and the kernel maps follow."""
    layout, kernel = Layout("t"), FakeMaps()
    run(
        layout,
        kernel,
        [PutService(KEY, WRR), PutReal(KEY, real(1), 250), PutReal(KEY, real(2), 750)],
    )
    assert sorted(layout.services[KEY].slots, key=str) == [real(1)] + [real(2)] * 3
    run(layout, kernel, [PutReal(KEY, real(1), 1000)])  # 1000:750 is 4:3
    assert len(layout.services[KEY].slots) == 7
    weights = {real(i): 1 + (i * 337) % 1000 for i in range(300)}
    layout.begin()
    layout.defer()  # one batch, as the backend plans it
    batch = [PutService(KEY2, WRR), *(PutReal(KEY2, r, w) for r, w in weights.items())]
    kernel.run([c for op in batch for c in layout.plan(op)[0]] + layout.flush_deferred())
    kernel.check(layout)
    service = layout.services[KEY2]
    assert len(service.slots) == MAX_SLOTS
    total = sum(weights.values())
    worst = max(
        abs(service.slots.count(r) / len(service.slots) - w / total) for r, w in weights.items()
    )
    print(f"300 reals, weights 1..1000: {len(service.slots)} slots, worst share error {worst:.5%}")
    assert worst <= 1 / MAX_SLOTS
    # Changing one weight re-apportions; the kernel maps still equal the mirror (run checks).
    run(layout, kernel, [PutReal(KEY2, real(7), 0), DeleteReal(KEY2, real(8))])
    assert real(7) not in service.slots and service.consistent()


def test_a_leftover_lc_service_is_removed_at_reload_not_kept_as_round_robin() -> None:
    from lb.nft.layout import options_comment

    comment = options_comment(ServiceOptions(Scheduler.LEAST_CONNECTIONS))
    assert comment == "meshplane sched=lc proxy=0"  # what an older version wrote
    listing = {
        "nftables": [
            {
                "map": {
                    "table": "t",
                    "name": "vips",
                    "elem": [
                        [
                            {"concat": ["10.0.0.1", "tcp", 80]},
                            {"goto": {"target": "svc_tcp_10_0_0_1_80"}},
                        ]
                    ],
                }
            },
            {"map": {"table": "t", "name": "slots_tcp_10_0_0_1_80"}},
            {"map": {"table": "t", "name": "weights_tcp_10_0_0_1_80"}},
            {
                "rule": {
                    "table": "t",
                    "chain": "svc_tcp_10_0_0_1_80",
                    "comment": comment,
                    "expr": [{"counter": "conns_tcp_10_0_0_1_80"}, {"reject": None}],
                }
            },
        ]
    }
    found = parse_listing("t", listing)
    assert KEY in found.broken and KEY not in found.layout.services
    assert any("lc" in problem for problem in found.problems)


def test_a_listing_reads_back_into_the_table() -> None:
    """The JSON shapes `nft -j list table` (1.0.6) prints for the backend's objects."""
    published = VirtualKey("udp", ANY_ADDRESS, 30053)
    listing = {
        "nftables": [
            {"metainfo": {"version": "1.0.6"}},
            {
                "map": {
                    "table": "t",
                    "name": "vips",
                    "elem": [
                        [
                            {"concat": ["10.0.0.1", "tcp", 80]},
                            {"goto": {"target": "svc_tcp_10_0_0_1_80"}},
                        ]
                    ],
                }
            },
            {
                "map": {
                    "table": "t",
                    "name": "published",
                    "elem": [
                        [{"concat": ["udp", 30053]}, {"goto": {"target": "svc_udp_any_30053"}}]
                    ],
                }
            },
            {
                "map": {
                    "table": "t",
                    "name": "slots_tcp_10_0_0_1_80",
                    # weight 2 alone is one slot (weights reduced by their gcd)
                    "elem": [[0, {"concat": ["10.1.0.1", 8080]}]],
                }
            },
            {
                "map": {
                    "table": "t",
                    "name": "weights_tcp_10_0_0_1_80",
                    "elem": [
                        [{"concat": ["10.1.0.1", 8080]}, 2],
                        [{"concat": ["10.1.0.2", 8080]}, 0],
                    ],
                }
            },
            {"map": {"table": "t", "name": "slots_udp_any_30053"}},
            {"map": {"table": "t", "name": "weights_udp_any_30053"}},
            {
                "rule": {
                    "table": "t",
                    "chain": "svc_tcp_10_0_0_1_80",
                    "comment": "meshplane sched=wrr proxy=0",
                    "expr": [
                        {"counter": "conns_tcp_10_0_0_1_80"},
                        {
                            "dnat": {
                                "family": "ip",
                                "addr": {
                                    "map": {
                                        "key": {"numgen": {"mode": "inc", "mod": 1}},
                                        "data": "@slots",
                                    }
                                },
                            }
                        },
                    ],
                }
            },
            {
                "rule": {
                    "table": "t",
                    "chain": "svc_udp_any_30053",
                    "comment": "meshplane sched=rr proxy=0",
                    "expr": [{"counter": "conns_udp_any_30053"}, {"reject": None}],
                }
            },
            {"counter": {"table": "t", "name": "conns_tcp_10_0_0_1_80", "packets": 3}},
            {"counter": {"table": "t", "name": "conns_udp_any_30053", "packets": 0}},
        ]
    }
    found = parse_listing("t", listing)
    assert found.problems == []
    assert found.endpoints_missing == {("10.1.0.1", "tcp", 8080), ("10.1.0.2", "tcp", 8080)}
    assert found.layout.to_table() == {
        KEY: apply_ops(
            {},
            [
                PutService(KEY, WRR),
                PutReal(KEY, Real("10.1.0.1", 8080), 2),
                PutReal(KEY, Real("10.1.0.2", 8080), 0),
            ],
        )[KEY],
        published: apply_ops({}, [PutService(published)])[published],
    }
    # a rule whose modulus disagrees with the ring is marked for repair
    listing["nftables"][7]["rule"]["expr"][1]["dnat"]["addr"]["map"]["key"]["numgen"]["mod"] = 3  # type: ignore[index]
    assert parse_listing("t", listing).repair == {KEY}
    # a table of an older version (no counter): repaired, which makes the counter
    del listing["nftables"][-1]
    assert parse_listing("t", listing).repair == {KEY, published}
    assert parse_counters(listing) == {"conns_tcp_10_0_0_1_80": 3}
    layout = parse_listing("t", listing).layout
    repaired = layout.repair(published)
    assert repaired[0] == "add counter ip t conns_udp_any_30053"
    assert "add rule ip t svc_udp_any_30053 counter name conns_udp_any_30053 reject" in (
        " ".join(repaired[-1].split()[:9])
    )


def test_one_mark_bit_tells_our_flows_from_others() -> None:
    layout = Layout("t", mark=0x4000)
    layout.plan(PutService(KEY))
    commands, _ = layout.plan(PutReal(KEY, real(1), 1))
    assert any("meta mark set meta mark | 0x4000 dnat ip to" in c for c in commands)
    base = "\n".join(base_commands("t", 0x4000))
    assert (
        'meta mark & 0x4000 == 0x4000 oif != "lo" meta mark set meta mark & 0xffffbfff '
        "masquerade" in base
    )


def test_maglev_fills_the_slots_with_the_lookup_table_and_hashes_the_flow() -> None:
    layout, kernel = Layout("t"), FakeMaps()
    run(layout, kernel, [PutService(KEY, MAGLEV), *(PutReal(KEY, real(i), 1) for i in range(10))])
    service = layout.services[KEY]
    assert len(service.slots) == maglev.table_size(10) == 16381
    assert service.slots == maglev.build([real(i) for i in range(10)], 16381)
    assert (
        f"jhash ip saddr . tcp sport mod 16381 seed {HASH_SEED:#x} map"
        in kernel.rules[chain_name(KEY)][-1]
    )
    # Removing one of ten rewrites about its tenth of the table, not the whole table.
    commands, _ = layout.plan(DeleteReal(KEY, real(3)))
    kernel.run(commands)
    kernel.check(layout)
    rewritten = sum(c.count(" : ") for c in commands if c.startswith("add element ip t slots_"))
    print(f"maglev: removing 1 of 10 reals rewrote {rewritten} of 16381 entries")
    assert 16381 // 10 <= rewritten <= 16381 * 0.12
    assert not any(c.startswith("flush chain") for c in commands), "the modulus did not change"


def test_affinity_sets_per_real_come_and_go_with_its_readiness() -> None:
    layout, kernel = Layout("t"), FakeMaps()
    run(layout, kernel, [PutService(KEY, AFFINE), PutReal(KEY, real(1), 1)])
    one, two = affinity_set(KEY, real(1)), affinity_set(KEY, real(2))
    assert kernel.rules[chain_name(KEY)][0] == (
        f"meta l4proto tcp ip saddr @{one} update @{one} {{ ip saddr timeout 300s }} "
        f"counter name {counter_name(KEY)} meta mark set meta mark | {DEFAULT_MASQUERADE_MARK:#x} "
        f"dnat ip to {real(1).address}:8080"
    )
    run(layout, kernel, [PutReal(KEY, real(2), 1)])
    assert kernel.sets == {one, two}, "a new real leaves the other reals' clients be"
    run(layout, kernel, [PutReal(KEY, real(2), 0)])
    assert kernel.sets == {one}, "a draining real keeps no client"
    run(layout, kernel, [DeleteReal(KEY, real(1))])
    assert kernel.sets == set()
    run(layout, kernel, [PutReal(KEY, real(3), 1), PutService(KEY, ServiceOptions())])
    assert kernel.sets == set(), "affinity turned off: its sets go"


def test_maglev_and_affinity_survive_the_rule_comment() -> None:
    for options in (MAGLEV, AFFINE, ServiceOptions(Scheduler.MAGLEV, affinity=60)):
        layout = Layout("t")
        commands, _ = layout.plan(PutService(KEY, options))
        comment = next(c for c in commands if "comment" in c).split('comment "')[1][:-1]
        assert parse_options_comment(comment) == options


def test_a_batch_reweaves_each_wrr_ring_once_not_once_per_op() -> None:
    """300 weights in one batch: one ring rewrite at the end (the backend's `defer`),
    not 300 rewrites of a ring of thousands of slots (which the kernel refused:
    "No buffer space available"); the kernel maps still equal the mirror."""
    weights = {real(i): 1 + (i * 337) % 1000 for i in range(300)}
    ops: list[Op] = [PutService(KEY, WRR), *(PutReal(KEY, r, w) for r, w in weights.items())]
    layout, kernel = Layout("t"), FakeMaps()
    layout.begin()
    layout.defer()
    commands = [c for op in ops for c in layout.plan(op)[0]]
    commands += layout.flush_deferred()
    kernel.run(commands)
    kernel.check(layout)
    elements = sum(
        c.count(" : ") for c in commands if c.startswith(f"add element ip t {slots_map(KEY)}")
    )
    assert elements == MAX_SLOTS, "each slot written once"
    # and a batch that changes them all again rewrites only the slots that change
    layout.begin()
    layout.defer()
    again = [c for r, w in weights.items() for c in layout.plan(PutReal(KEY, r, w % 7 + 1))[0]]
    kernel.run(again + layout.flush_deferred())
    kernel.check(layout)
