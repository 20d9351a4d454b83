"""The nftables backend on a real kernel, in network namespaces made per test.

The topology, the echo servers and the clients are in `tests/lb/nft_harness.py`.
Each test gets fresh namespaces (removed afterwards); the backend programs the
node namespace through its `netns` argument, exactly as an agent would program
its own (an agent leaves `netns` at None).
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Sequence

import pytest

from lb.nft import NftablesBackend
from lb.table import (
    ANY_ADDRESS,
    DeleteReal,
    DeleteService,
    PutReal,
    PutService,
    Real,
    Scheduler,
    ServiceOptions,
    VirtualKey,
    VirtualService,
)
from tests.helpers.netns import Lab
from tests.lb.backend_suite import BackendSuite, spread
from tests.lb.nft_harness import (
    BEHIND,
    CLIENT,
    LOCAL,
    NODE,
    PEER,
    TIMEOUT,
    NftHarness,
    build,
    parse_greeting,
    skip_reason,
    udp_ask,
)
from tests.lb.weights_suite import WeightsSuite

pytestmark = [pytest.mark.root]

WRR = ServiceOptions(Scheduler.WEIGHTED_ROUND_ROBIN)


@pytest.fixture
async def harness() -> AsyncIterator[NftHarness]:
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    with Lab("mpnft") as lab:
        made = build(lab)
        try:
            for address in BEHIND:
                await made.serve(made.reals, address)
            await made.serve(made.node, LOCAL)
            await made.serve(made.peer, PEER)
            yield made
        finally:
            await made.close()


class TestNftablesBackendSuite(BackendSuite):
    """The shared suite, against the kernel in the node namespace."""

    least_connections = False


class TestNftablesWeights(WeightsSuite):
    """Weights and draining; `lc` refused with a clear error (issue 19)."""

    least_connections = False


# -- what only a kernel backend has to show -----------------------------------------------


async def started(harness: NftHarness) -> NftablesBackend:
    backend = await harness.new_backend()
    await backend.start({})
    assert isinstance(backend, NftablesBackend)
    return backend


async def test_established_tcp_flow_survives_changes_to_other_reals(harness: NftHarness) -> None:
    backend = await started(harness)
    key = VirtualKey("tcp", harness.vip(1), 8080)
    a, b, c = harness.real(1), harness.real(2), harness.real(4)
    await backend.apply([PutService(key), PutReal(key, a, 1), PutReal(key, b, 1)])
    streams = [await harness.connect(key) for _ in range(2)]  # round robin: one each
    ((_, reader, writer),) = [s for s in streams if s[0].real == a]
    await backend.apply([DeleteReal(key, b), PutReal(key, c, 1)])
    writer.write(b"still there?\n")
    assert await asyncio.wait_for(reader.readline(), TIMEOUT) == b"still there?\n"
    assert set(await spread(harness, key, 6)) == {a, c}
    # Nor does a new scheduler (every slot rewritten), or another service coming and going.
    other = VirtualKey("tcp", harness.vip(2), 8080)
    await backend.apply(
        [
            PutService(key, ServiceOptions(Scheduler.WEIGHTED_ROUND_ROBIN)),
            PutReal(key, c, 3),
            PutService(other),
            PutReal(other, a, 1),
        ]
    )
    await backend.apply([DeleteService(other)])
    writer.write(b"and now?\n")
    assert await asyncio.wait_for(reader.readline(), TIMEOUT) == b"and now?\n"
    for _, _, w in streams:
        w.close()


async def test_removed_real_loses_its_udp_flow_a_draining_one_keeps_it(harness: NftHarness) -> None:
    backend = await started(harness)
    key = VirtualKey("udp", harness.vip(2), 5353)
    a, b = harness.real(1), harness.real(2)
    await backend.apply([PutService(key), PutReal(key, a, 1)])
    flow = harness.client.socket(kind=socket.SOCK_DGRAM)  # one source port: one conntrack flow
    with flow:
        assert (await udp_ask(flow, harness.target(key))).real == a  # type: ignore[union-attr]
        # Draining (weight 0): the flow conntrack holds goes on to `a`.
        await backend.apply([PutReal(key, b, 1), PutReal(key, a, 0)])
        assert (await udp_ask(flow, harness.target(key))).real == a  # type: ignore[union-attr]
        # Removed: its conntrack entry is flushed, so the same flow now reaches `b`
        # (the echo server on `a` still runs: only the flush keeps it from answering).
        await backend.apply([DeleteReal(key, a)])
        assert (await udp_ask(flow, harness.target(key))).real == b  # type: ignore[union-attr]


async def test_client_address_is_kept_when_the_real_routes_back_through_the_node(
    harness: NftHarness,
) -> None:
    backend = await started(harness)
    vip = VirtualKey("tcp", harness.vip(1), 8080)
    published = VirtualKey("tcp", ANY_ADDRESS, 30080)
    await backend.apply(
        [
            PutService(vip),
            PutReal(vip, harness.real(1), 1),
            PutService(published),
            PutReal(published, harness.real(2), 1),
        ]
    )
    for key in (vip, published):
        answer = await harness.ask(key)
        assert answer is not None, key
        assert answer.peer == CLIENT, f"{key}: the real saw {answer.peer}, not the client"


async def test_routing_mesh_published_port_to_a_task_on_another_node(harness: NftHarness) -> None:
    """Client -> this node's address:published -> DNAT to a task on `peer`, reply back.

    `peer` sits on the client's own network and would answer the client directly;
    only the masquerade brings the reply back through the node to be un-DNATed.
    """
    backend = await started(harness)
    key = VirtualKey("tcp", ANY_ADDRESS, 30081)
    udp = VirtualKey("udp", ANY_ADDRESS, 30081)
    remote = harness.real(5)
    await backend.apply(
        [PutService(key), PutReal(key, remote, 1), PutService(udp), PutReal(udp, remote, 1)]
    )
    for service in (key, udp):
        answer = await harness.ask(service)
        assert answer is not None, f"{service}: no answer through the routing mesh"
        assert answer.real == remote
        assert answer.peer == NODE, f"{service}: masqueraded to the node, saw {answer.peer}"


async def test_the_nodes_own_processes_reach_vips_and_published_ports(harness: NftHarness) -> None:
    backend = await started(harness)
    vip = VirtualKey("tcp", harness.vip(3), 8080)
    published = VirtualKey("tcp", ANY_ADDRESS, 30082)
    await backend.apply(
        [
            PutService(vip),
            PutReal(vip, harness.real(1), 1),
            PutService(published),
            PutReal(published, harness.real(5), 1),
            PutReal(published, harness.real(3), 1),
        ]
    )
    assert (await harness.ask(vip, ns=harness.node)).real == harness.real(1)  # type: ignore[union-attr]
    seen = {
        (await harness.ask(published, ns=harness.node)).real  # type: ignore[union-attr]
        for _ in range(4)
    }
    assert seen == {harness.real(5), harness.real(3)}


async def test_a_damaged_leftover_is_repaired_at_start(harness: NftHarness) -> None:
    first = await started(harness)
    key = VirtualKey("tcp", harness.vip(1), 8080)
    one, two = harness.real(1), harness.real(2)
    await first.apply([PutService(key), PutReal(key, one, 1), PutReal(key, two, 1)])
    await first.abandon()
    # Someone deletes a slot by hand: the ring now has a hole the rule still counts.
    harness.node.run(
        ["nft", "delete", "element", "ip", "meshplane", "slots_tcp_10_77_100_1_8080", "{ 0 }"]
    )
    second = await harness.new_backend()
    await second.start({key: VirtualService(key, ServiceOptions(), {one: 1, two: 1})})
    assert set(await spread(harness, key, 6)) == {one, two}
    assert (await second.read())[key].reals == {one: 1, two: 1}


async def test_restart_keeps_established_flows_of_matching_reals(harness: NftHarness) -> None:
    first = await started(harness)
    key = VirtualKey("tcp", harness.vip(1), 8080)
    one = harness.real(1)
    await first.apply([PutService(key), PutReal(key, one, 1)])
    answer, reader, writer = await harness.connect(key)
    await first.abandon()
    second = await harness.new_backend()
    await second.start(await first.read())
    writer.write(b"after restart\n")
    assert await asyncio.wait_for(reader.readline(), TIMEOUT) == b"after restart\n"
    writer.close()
    assert answer.real == one


async def test_published_port_at_localhost_and_route_localnet_put_back_at_close(
    harness: NftHarness,
) -> None:
    def localnet() -> str:
        return harness.node.run(["sysctl", "-n", "net.ipv4.conf.all.route_localnet"]).stdout.strip()

    assert localnet() == "0"
    first = await started(harness)
    key = VirtualKey("tcp", ANY_ADDRESS, 30083)
    udp = VirtualKey("udp", ANY_ADDRESS, 30083)
    await first.apply(
        [
            PutService(key),
            PutReal(key, harness.real(5), 1),
            PutService(udp),
            PutReal(udp, harness.real(5), 1),
        ]
    )
    for service in (key, udp):
        answer = await harness.ask(service, ns=harness.node, at="127.0.0.1")
        assert answer is not None and answer.real == harness.real(5), service
    assert localnet() == "1"
    # A crash and a restart: the value from before the first start is still known.
    await first.abandon()
    second = await started(harness)
    await second.close()
    assert localnet() == "0"


async def test_without_localhost_route_localnet_is_left_alone(harness: NftHarness) -> None:
    backend = NftablesBackend(netns=harness.node.name, localhost=False)
    harness.backends.append(backend)
    await backend.start({})
    assert (
        harness.node.run(["sysctl", "-n", "net.ipv4.conf.all.route_localnet"]).stdout.strip() == "0"
    )
    listing = harness.node.run(["nft", "list", "chain", "ip", "meshplane", "guard"]).stdout
    assert "drop" not in listing


async def test_only_draining_reals_refuse_new_connections_at_once_old_ones_go_on(
    harness: NftHarness,
) -> None:
    backend = await started(harness)
    key = VirtualKey("tcp", harness.vip(1), 8080)
    one = harness.real(1)
    await backend.apply([PutService(key), PutReal(key, one, 1)])
    _, reader, writer = await harness.connect(key)
    await backend.apply([PutReal(key, one, 0)])
    with pytest.raises(ConnectionRefusedError):  # the reject rule, not a black hole
        await harness.connect(key)
    writer.write(b"draining\n")
    assert await asyncio.wait_for(reader.readline(), TIMEOUT) == b"draining\n"
    writer.close()


async def test_a_bad_op_is_reported_and_the_others_in_its_batch_are_programmed(
    harness: NftHarness,
) -> None:
    from lb.backend import BackendError

    backend = await started(harness)
    key = VirtualKey("tcp", harness.vip(1), 8080)
    bad = VirtualKey("tcp", "10.77.100.300", 8080)
    with pytest.raises(BackendError, match=r"10\.77\.100\.300.*; .*weight 9999"):
        await backend.apply(
            [
                PutService(bad),
                PutService(key),
                PutReal(key, harness.real(1), 1),
                PutReal(key, Real("10.77.2.2", 7001), 9999),
            ]
        )
    assert await backend.read() == {
        key: VirtualService(key, ServiceOptions(), {harness.real(1): 1})
    }
    assert await harness.hit(key) == harness.real(1)


async def test_a_real_on_the_published_port_itself_is_not_balanced_again(
    harness: NftHarness,
) -> None:
    """A task on the node's address with the published port as its own port keeps it.

    Otherwise a flow DNATed to it from another node would be balanced a second
    time on arrival (and could bounce between nodes).
    """
    key = VirtualKey("tcp", ANY_ADDRESS, 30084)
    on_node = Real(NODE, key.port)
    await harness.serve(harness.node, NODE, key.port)
    backend = await started(harness)
    await backend.apply(
        [PutService(key), PutReal(key, on_node, 1), PutReal(key, harness.real(5), 1)]
    )
    assert set(await spread(harness, key, 4)) == {on_node}
    # Through another address of the node the port is balanced as usual.
    seen = {(await harness.ask(key, at="10.77.2.1")).real for _ in range(4)}  # type: ignore[union-attr]
    assert seen == {on_node, harness.real(5)}


async def test_a_task_calling_its_own_service_through_the_node_gets_its_answer(
    harness: NftHarness,
) -> None:
    """Hairpin: client and real on the same network behind the node (east-west).

    The real would answer the client directly, so the flow is masqueraded to
    the node; without that the client would drop an answer from the wrong source.
    """
    backend = await started(harness)
    key = VirtualKey("tcp", harness.vip(4), 8080)
    await backend.apply([PutService(key), PutReal(key, harness.real(2), 1)])
    answer = await harness.ask(key, ns=harness.reals)  # from 10.77.2.2, the real is .3
    assert answer is not None and answer.real == harness.real(2)
    assert answer.peer == "10.77.2.1"


async def test_flows_another_table_dnats_are_not_masqueraded(harness: NftHarness) -> None:
    """The masquerade is for the backend's own flows: a foreign DNAT is not altered.

    The foreign table DNATs port 9998 to `peer`, on the client's network (the
    case where our own flows are masqueraded); its flow must keep the client's
    address: the node's conntrack entry has no source NAT.
    """
    from pyroute2.conntrack import AsyncConntrack
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    await harness.make_foreign()
    backend = await started(harness)
    key = VirtualKey("tcp", ANY_ADDRESS, 30085)
    await backend.apply([PutService(key), PutReal(key, harness.real(5), 1)])
    assert (await harness.ask(key)).peer == NODE  # type: ignore[union-attr]  # ours: masqueraded
    await harness.ask(VirtualKey("tcp", ANY_ADDRESS, 9998))  # theirs: no answer expected
    conntrack = AsyncConntrack(netns=harness.node.name)
    try:
        flows = [
            entry
            async for entry in await conntrack.dump_entries(
                tuple_orig=NFCTAttrTuple(proto=socket.IPPROTO_TCP, dport=9998)
            )
        ]
    finally:
        conntrack.close()
    assert flows, "the foreign DNAT flow should be in the node's conntrack"
    assert all(entry.tuple_reply.daddr == CLIENT for entry in flows), flows


class CountingBackend(NftablesBackend):
    """The real backend, counting the nft commands each transaction carries."""

    transactions: list[int]

    async def _run(self, commands: Sequence[str]) -> None:
        self.transactions = [*getattr(self, "transactions", []), len(commands)]
        await super()._run(commands)


async def test_one_change_among_ten_thousand_reals_costs_a_constant_number_of_operations(
    harness: NftHarness,
) -> None:
    backend = CountingBackend(netns=harness.node.name)
    harness.backends.append(backend)
    await backend.start({})
    key = VirtualKey("tcp", harness.vip(1), 8080)
    many = [Real(f"10.80.{i // 250}.{i % 250 + 1}", 80) for i in range(10_000)]
    await backend.apply(
        [PutService(key), *(PutReal(key, r, 0) for r in many), PutReal(key, harness.real(1), 1)]
    )
    costs = []
    for change in (
        [PutReal(key, many[0], 1)],
        [PutReal(key, many[5_000], 1)],
        [PutReal(key, many[0], 0)],
        [DeleteReal(key, many[5_000])],
        [PutReal(key, harness.real(2), 1)],
        [DeleteReal(key, harness.real(2))],
    ):
        await backend.apply(change)
        costs.append(backend.transactions[-1])
    assert max(costs) <= 8, costs  # one transaction each, a handful of commands
    assert len((await backend.read())[key].reals) == 10_000  # one of the many was removed
    # (draining reals elsewhere have no slots: new connections reach the live one)
    assert await harness.hit(key) == harness.real(1)


async def test_the_backend_works_under_uvloop_the_agents_loop(harness: NftHarness) -> None:
    """pyroute2's netlink socket does not run on uvloop: the flush must still work there."""
    import uvloop

    key = VirtualKey("udp", harness.vip(2), 5353)
    a, b = harness.real(1), harness.real(2)
    flow = harness.client.socket(kind=socket.SOCK_DGRAM)
    flow.settimeout(TIMEOUT)

    def ask() -> Real | None:
        flow.sendto(b"?", harness.target(key))
        answer = parse_greeting(flow.recv(512))
        return None if answer is None else answer.real

    async def scenario() -> tuple[Real | None, Real | None]:
        backend = NftablesBackend(netns=harness.node.name)
        await backend.start({})
        try:
            await backend.apply([PutService(key), PutReal(key, a, 1)])
            first = await asyncio.to_thread(ask)
            await backend.apply([PutReal(key, b, 1), DeleteReal(key, a)])
            return first, await asyncio.to_thread(ask)
        finally:
            await backend.close()

    with flow:  # the echo servers answer from this test's loop, free while uvloop runs
        assert await asyncio.to_thread(uvloop.run, scenario()) == (a, b)


async def test_300_weighted_reals_exact_over_a_cycle_then_capped_within_a_slot(
    harness: NftHarness,
) -> None:
    """Issue 19: "300 tasks with weights work on nftables" (the old cap: 256 per real).

    Weights 100..1000 in steps of 100 reduce by their gcd to a ring of some 1,650
    slots: two whole cycles of connections give each real exactly twice its reduced
    weight. Then weights with no common divisor: the ring is capped at MAX_SLOTS
    and each real's share, read back from the kernel's map, is within one slot."""
    from lb.nft.layout import slots_map
    from lb.nft.slots import MAX_SLOTS

    reals = [Real(BEHIND[i % 3], 7100 + i // 3) for i in range(300)]
    for real in reals:
        await harness.serve(harness.reals, real.address, real.port)
    backend = await started(harness)
    key = VirtualKey("tcp", harness.vip(5), 8080)
    exact = {real: 100 * (1 + i % 10) for i, real in enumerate(reals)}
    loop = asyncio.get_running_loop()
    started_at = loop.time()
    await backend.apply([PutService(key, WRR), *(PutReal(key, r, w) for r, w in exact.items())])
    programmed = loop.time() - started_at
    assert (await backend.read())[key].reals == exact
    cycle = sum(exact.values()) // 100
    seen = await spread(harness, key, 2 * cycle)
    print(f"300 reals, weights 100..1000: ring {cycle} slots (programmed in {programmed:.2f} s)")
    assert seen == {real: 2 * w // 100 for real, w in exact.items()}, "not exact over cycles"

    capped = {real: 1 + (i * 337) % 1000 for i, real in enumerate(reals)}
    started_at = loop.time()
    await backend.apply([PutReal(key, r, w) for r, w in capped.items()])
    reprogrammed = loop.time() - started_at
    assert (await backend.read())[key].reals == capped
    listing = harness.node.run(["nft", "-j", "list", "map", "ip", "meshplane", slots_map(key)])
    counts: dict[Real, int] = {}
    for item in json.loads(listing.stdout)["nftables"][1]["map"]["elem"]:
        address, port = item[1]["concat"]
        counts[Real(address, port)] = counts.get(Real(address, port), 0) + 1
    total, slots = sum(capped.values()), sum(counts.values())
    worst = max(abs(counts.get(r, 0) / slots - w / total) for r, w in capped.items())
    print(
        f"300 reals, weights 1..1000 (gcd 1): {slots} slots in the kernel "
        f"(re-programmed in {reprogrammed:.2f} s), worst share error {worst:.5%}"
    )
    assert slots == MAX_SLOTS and worst <= 1 / MAX_SLOTS
    seen = await spread(harness, key, 600)
    assert seen[None] == 0 and len(seen) > 150, f"{len(seen)} reals answered 600 connections"
