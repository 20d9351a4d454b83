"""`--opt encrypted` on overlay networks, without a kernel: the option's rules in the
store and the API's words, the MTU, the filter's rules per VNI, when a sync is due
(`mesh.sandbox.encryption`), and the sandbox manager's encryption job (its want from
the served encrypted overlays, the alive nodes' VTEPs and the keyring; re-synced when
any of them changes; a failure counted, retried, never in clear text). Issue 16."""

from __future__ import annotations

import asyncio
import threading

import pytest

from gossip.security import Keyring
from mesh.errors import Invalid
from mesh.liveness import Liveness
from mesh.sandbox import encryption, esp, espfilter, manager, xfrm
from mesh.sandbox.driver import NetworkPlan
from mesh.sandbox.encryption import NONE, EspSchedule, EspWant
from mesh.sandbox.manager import SandboxManager
from mesh.sandbox.overlay import VXLAN_OVERHEAD, overhead
from mesh.state.specs import NetworkSpec
from mesh.state.store import Store
from tests.unit.test_overlay_manager import VTEPS, FakeOverlay, feed
from tests.unit.test_overlay_state import exchange, node, overlay

K1, K2 = b"\x01" * 16, b"\x02" * 16

# -- the option ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, False),
        ({"encrypted": ""}, True),  # Docker's `--opt encrypted`
        ({"encrypted": "true"}, True),
        ({"encrypted": "ON"}, True),
        ({"encrypted": "false"}, False),
        ({"encrypted": "0"}, False),
    ],
)
def test_the_encrypted_option(options: dict[str, str], expected: bool) -> None:
    assert esp.is_encrypted(options) is expected


def test_an_unreadable_encrypted_value_is_refused_by_the_store() -> None:
    store = node("n1")
    with pytest.raises(Invalid, match="expected true or false"):
        store.create_network(
            NetworkSpec(name="x", driver="overlay", options={"encrypted": "maybe"}), 0.0
        )


@pytest.mark.parametrize("driver", ["bridge", "macvlan"])
def test_encrypted_is_an_overlays_option_only(driver: str) -> None:
    store = node("n1")
    options = {"encrypted": "", "parent": "eth0"} if driver == "macvlan" else {"encrypted": ""}
    with pytest.raises(Invalid, match="overlay network's option") as caught:
        store.create_network(NetworkSpec(name="x", driver=driver, options=options), 0.0)
    assert caught.value.status == 422 and caught.value.code == "encrypted_needs_overlay"
    # encrypted=false says nothing to encrypt: any driver takes it
    store.create_network(NetworkSpec(name="y", driver="bridge", options={"encrypted": "no"}), 0)


def test_an_encrypted_overlays_mtu_leaves_room_for_esp() -> None:
    def plan(options: dict[str, str]) -> NetworkPlan:
        return NetworkPlan("id", "n", "10.0.0.0/24", "10.0.0.1", False, options, 4097)

    assert overhead(plan({})) == VXLAN_OVERHEAD == 50
    assert overhead(plan({"encrypted": ""})) == 50 + esp.ESP_OVERHEAD
    assert overhead(plan({"encrypted": "false"})) == 50
    assert overhead(plan({"encrypted": "garbage"})) == 50 + esp.ESP_OVERHEAD  # fails closed
    assert 1500 - overhead(plan({"encrypted": ""})) == 1410


# -- the filter -----------------------------------------------------------------------


def test_the_filter_marks_and_guards_exactly_the_encrypted_vnis() -> None:
    script = espfilter.render([4099, 4097, 4099], 4790)
    assert "udp dport 4790 @th,96,24 { 4097, 4099 } meta mark set" in script
    assert f"| 0x{esp.MARK:08x}" in script
    assert "type route hook output priority mangle" in script  # the mark re-routes
    assert 'rt ipsec missing counter name "plain_out_dropped" drop' in script
    assert 'meta ipsec missing counter name "plain_in_dropped" drop' in script
    # the counters survive a rewrite: the chains are flushed, the table is not deleted
    assert "delete table" not in script and "flush chain inet meshplane_esp in" in script
    assert espfilter.render([], 4789) == (
        "table inet meshplane_esp {}\ndelete table inet meshplane_esp\n"
    )


def test_the_filters_counters_are_read_from_nft_json() -> None:
    text = (
        '{"nftables": [{"metainfo": {"version": "1.0.6"}}, {"counter": {"family": "inet", '
        '"name": "plain_in_dropped", "table": "meshplane_esp", "handle": 2, "packets": 7, '
        '"bytes": 700}}, {"counter": {"name": "someone_else", "packets": 9}}]}'
    )
    assert espfilter.parse_counters(text) == {"plain_out_dropped": 0, "plain_in_dropped": 7}


# -- when to sync ---------------------------------------------------------------------


def test_the_want_is_the_encrypted_vnis_the_peers_and_the_keyring() -> None:
    overlays = [(4096, {}), (4097, {"encrypted": ""}), (4098, {"encrypted": "false"})]
    wanted = encryption.want(overlays, ["192.0.2.2"], [K2, K1], 4789)
    assert wanted == EspWant(frozenset({4097}), frozenset({"192.0.2.2"}), (K2, K1), 4789)
    assert K1.hex() not in repr(wanted)  # keys never in a log line
    assert encryption.want([(4096, {})], ["192.0.2.2"], [K1], 4789) == NONE
    assert not NONE.active
    # no keyring: still wanted (the filter makes the network silent), with no keys
    assert encryption.want(overlays, [], None, 4789).keys == ()
    # a value the store would refuse, in a record from elsewhere: encrypted
    assert encryption.want([(4099, {"encrypted": "?"})], [], None, 4789).vnis == {4099}


def test_a_sync_is_due_when_the_want_changes_and_a_failure_waits() -> None:
    schedule = EspSchedule(retry=5.0)
    a = encryption.want([(4097, {"encrypted": ""})], ["192.0.2.2"], [K1], 4789)
    assert schedule.due(NONE, 0.0)  # at start: an earlier run's leftovers go
    schedule.started()
    assert not schedule.due(a, 0.0)  # one queued at a time
    schedule.succeeded(NONE)
    assert not schedule.due(NONE, 1.0) and schedule.due(a, 1.0)
    schedule.started()
    assert schedule.failed(a, "no ESP", 1.0)  # new reason: logged
    assert not schedule.due(a, 2.0)  # the same want waits out the retry
    assert schedule.due(a, 6.0)
    assert not schedule.failed(a, "no ESP", 6.0)  # the same reason: not logged again
    b = encryption.want([(4097, {"encrypted": ""})], ["192.0.2.2"], [K2, K1], 4789)
    assert schedule.due(b, 6.5)  # a new want (a rotated keyring) does not wait
    schedule.succeeded(b)
    assert schedule.synced == b and schedule.last_error is None


# -- the manager's job ----------------------------------------------------------------


class EspOverlay(FakeOverlay):
    """The fake overlay driver with what the encryption job reads of the real one."""

    vtep = VTEPS["n1"]
    node_netns = "/run/netns/node1"
    port = 4789


Synced = tuple[EspWant, str, "str | None", int]


def esp_setup(
    monkeypatch: pytest.MonkeyPatch, fail: list[str] | None = None
) -> tuple[list[Store], SandboxManager, list[Synced], list[str]]:
    synced: list[Synced] = []
    threads: list[str] = []
    kernels: list[EspOverlay] = []

    def program(wanted: EspWant, vtep: str, netns: str | None, port: int) -> xfrm.SyncReport:
        threads.append(threading.current_thread().name)
        kernels[0].calls.append(("program_esp", ",".join(map(str, sorted(wanted.vnis)))))
        if fail:
            raise xfrm.XfrmError(fail[0])
        synced.append((wanted, vtep, netns, port))
        return xfrm.SyncReport(sas_added=1, rejected_remotes=1 if wanted.remotes else 0)

    monkeypatch.setattr(manager, "program_esp", program)
    monkeypatch.setattr(
        espfilter, "counters", lambda netns: {"plain_out_dropped": 0, "plain_in_dropped": 3}
    )
    monkeypatch.setattr(manager, "ESP_TICK", 0.05)
    stores = [node(name, vtep) for name, vtep in VTEPS.items()]
    overlay(stores[0], "plain", subnet="10.50.0.0/24")
    overlay(stores[0], "secret", subnet="10.51.0.0/24", options={"encrypted": ""})
    exchange(*stores)
    kernel = EspOverlay()
    kernels.append(kernel)
    mgr = SandboxManager("n1", {"overlay": kernel}, kernel, (), kernel.delete_link)
    mgr.use_keyring(lambda: [K1])
    mgr.load(stores[0].all_records())
    return stores, mgr, synced, threads


def mgr_calls(mgr: SandboxManager) -> list[tuple[str, str]]:
    kernel = mgr._drivers["overlay"]
    assert isinstance(kernel, EspOverlay)
    return list(kernel.calls)


async def until(condition: object, what: str, within: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not condition():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.02)


async def test_the_job_programs_the_encrypted_vnis_for_every_other_alive_node(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stores, mgr, synced, threads = esp_setup(monkeypatch)
    ring = Keyring([K1])
    mgr.use_keyring(lambda: ring)
    await mgr.start()
    try:
        await mgr.idle()
        # the filter and IPsec come before any peer is programmed (no VXLAN of the
        # encrypted network can leave plain in between)
        secret = stores[0].network("secret").vni
        calls = mgr_calls(mgr)
        assert calls[0] == ("program_esp", str(secret)), calls
        assert ("set_peers", "secret") in calls
        wanted, vtep, netns, port = synced[-1]
        assert wanted.vnis == {secret}  # not ingress's, not the plain network's
        assert wanted.remotes == {VTEPS["n2"], VTEPS["n3"]}
        assert wanted.keys == (K1,)
        assert (vtep, netns, port) == (VTEPS["n1"], "/run/netns/node1", 4789)
        assert set(threads) == {"sandbox_0"}  # the manager's one worker thread
        count = len(synced)
        await asyncio.sleep(0.3)  # ticks: nothing changed, nothing synced
        assert len(synced) == count

        # the keyring changes in place (mesh keyring install/use): the next tick syncs
        ring.install(K2)
        ring.use(K2)
        await until(lambda: synced[-1][0].keys == (K2, K1), "the rotation was not synced")

        # n3 dies: its VTEP leaves the peers (and comes back with it)
        liveness = Liveness(stores[0])
        feed(mgr, liveness.node_down("n3"))
        await mgr.idle()
        assert synced[-1][0].remotes == {VTEPS["n2"]}
        feed(mgr, liveness.node_up("n3"))
        await mgr.idle()
        assert synced[-1][0].remotes == {VTEPS["n2"], VTEPS["n3"]}
        feed(mgr, liveness.node_down("n3"))
        await mgr.idle()

        info = mgr.describe()
        assert info["encryption"] == {
            "networks": ["secret"],
            "peers": 1,
            "synced": True,
            "error": None,
            "collisions": 0,
            "rejected_remotes": 1,
            "plain_out_dropped": 0,
            "plain_in_dropped": 3,
        }
        stats = info["stats"]
        assert isinstance(stats, dict) and stats["esp_syncs"] == len(synced)

        # a new encrypted network: made, then its filter and IPsec, then its peers
        before = len(mgr_calls(mgr))
        made = stores[0].create_network(
            NetworkSpec(name="sec2", driver="overlay", options={"encrypted": ""}), 1.0
        )
        for change in made:
            mgr.on_change(change)
        await mgr.idle()
        calls = mgr_calls(mgr)[before:]
        sec2 = stores[0].network("sec2").vni
        program = ("program_esp", ",".join(map(str, sorted({secret, sec2}))))
        assert calls.index(("create_network", "sec2")) < calls.index(program), calls
        assert calls.index(program) < calls.index(("set_peers", "sec2")), calls
        for change in stores[0].remove_network("sec2", 1.0):
            mgr.on_change(change)

        # the last encrypted network goes: everything of ours is cleared
        for change in stores[0].remove_network("secret", 1.0):
            mgr.on_change(change)
        await mgr.idle()
        assert synced[-1][0] == NONE
    finally:
        await mgr.stop()


async def test_a_failed_sync_is_counted_reported_and_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fail = ["ip xfrm state add: Protocol not supported"]
    _, mgr, synced, threads = esp_setup(monkeypatch, fail)
    monkeypatch.setattr(encryption, "RETRY", 0.1)
    mgr._esp = EspSchedule(retry=0.1)
    mgr.use_keyring(lambda: [K1])
    await mgr.start()
    try:
        await until(lambda: len(threads) >= 3, "the failed sync was not retried")
        info = mgr.describe()
        encryption_info = info["encryption"]
        assert isinstance(encryption_info, dict)
        assert encryption_info["synced"] is False
        assert encryption_info["error"] == fail[0]
        stats = info["stats"]
        assert isinstance(stats, dict) and stats["esp_failures"] >= 3
        fail.clear()  # the kernel can now: the next retry succeeds
        await until(lambda: bool(synced), "no sync after the failure cleared")
        await until(lambda: mgr.describe()["encryption"]["synced"] is True, "not synced")  # type: ignore[index]
    finally:
        await mgr.stop()


async def test_an_agent_without_overlays_never_programs_encryption(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stores, _, synced, _ = esp_setup(monkeypatch)
    kernel = FakeOverlay()  # no VTEP: this node serves no overlays
    mgr = SandboxManager("n1", {"overlay": kernel}, kernel, (), kernel.delete_link)
    mgr.load(stores[0].all_records())
    mgr.use_keyring(lambda: [K1])
    await mgr.start()
    try:
        await mgr.idle()
        await asyncio.sleep(0.2)
        assert synced == []
    finally:
        await mgr.stop()


def test_the_program_step_fails_closed_without_a_keyring(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(espfilter, "apply", lambda vnis, port, netns: calls.append("filter"))
    monkeypatch.setattr(xfrm, "sync_pairs", lambda *a: calls.append("xfrm"))
    wanted = encryption.want([(4097, {"encrypted": ""})], ["192.0.2.2"], None, 4789)
    with pytest.raises(esp.EspError, match="has none"):
        manager.program_esp(wanted, "192.0.2.1", None, 4789)
    assert calls == ["filter"]  # the filter (drop what is not ESP) is there, no IPsec
    monkeypatch.setattr(xfrm, "clear", lambda netns: calls.append("clear") or xfrm.SyncReport())
    monkeypatch.setattr(espfilter, "remove", lambda netns: calls.append("unfilter"))
    manager.program_esp(NONE, "192.0.2.1", None, 4789)
    assert calls[1:] == ["clear", "unfilter"]
