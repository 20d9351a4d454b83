"""Encrypted overlay networks on a real kernel: per-network ESP between two nodes.

Needs a kernel with xfrm ESP and `rfc4106(gcm(aes))` (this machine's has neither:
`test_esp_vm.py` runs this file inside the stock-kernel VM, in one pytest call);
skipped, saying why, anywhere else.

Each test makes two node namespaces joined by a veth underlay (10.231.x.1 and
10.231.x.2) and, in each, two real `OverlayDriver` networks with their peers set
(`set_peers`), as the agent makes them: `plain` (VNI 4301, 10.232.x.0/24) and
`secret` (`--opt encrypted`, VNI 4302, 10.234.x.0/24); each node has its own
address on both (.1 on A, .2 on B). Encryption is programmed by the very step
the sandbox manager runs on its worker thread (`manager.program_esp`: the
filter `inet meshplane_esp`, then `xfrm.sync_pairs`). A raw AF_PACKET socket on
node B's underlay veth counts what crosses the wire, per VNI. Everything is
removed at the end, also after a failure (deleting a namespace takes its links,
its nftables tables and its xfrm state).
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import itertools
import json
import os
import socket
import struct
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from mesh.core.netns import entered
from mesh.sandbox import esp, espfilter, manager, xfrm
from mesh.sandbox.driver import NetworkPlan
from mesh.sandbox.encryption import NONE, EspWant
from mesh.sandbox.names import mac_of
from mesh.sandbox.overlay import OverlayDriver, Peer

pytestmark = [pytest.mark.root, pytest.mark.slow]

K1, K2, WRONG = b"\x01" * 16, b"\x02" * 32, b"\x03" * 16
PORT = 4789
PLAIN, SECRET = "plain", "secret"
VNIS = {PLAIN: 4301, SECRET: 4302}
ECHO_PORT, UDP_PORT = 7007, 7008
MAX_MESSAGES = 1500  # the rotation test's bound (a few hundred are sent in practice)
_counter = itertools.count()


def _run(
    argv: list[str], *, check: bool = True, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        argv, input=stdin, capture_output=True, text=True, timeout=60, check=False
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.returncode} {done.stderr.strip()}")
    return done


def _why_no_esp() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces and xfrm need root"
    name = f"t16espprobe-{os.getpid()}"
    _run(["ip", "netns", "add", name])
    try:
        line = (
            "xfrm state add src 10.0.0.1 dst 10.0.0.2 proto esp spi 0x1000 reqid 1 "
            f'mode transport aead "{esp.AEAD}" 0x{"00" * 20} {esp.ICV_BITS}\n'
        )
        done = subprocess.run(
            ["ip", "-n", name, "-batch", "-"],
            input=line,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            return (
                f"this kernel has no xfrm ESP with {esp.AEAD} ({done.stderr.strip()}); "
                "test_esp_vm.py runs this file in the stock-kernel VM"
            )
        return None
    finally:
        _run(["ip", "netns", "del", name], check=False)


_REASON = _why_no_esp()
if _REASON is not None:
    pytestmark.append(pytest.mark.skip(reason=_REASON))


@dataclass
class Pair:
    """Nodes A and B, an underlay veth between them, two overlay networks over it."""

    n: int = field(default_factory=lambda: next(_counter) % 200)

    def __post_init__(self) -> None:
        tag = f"{os.getpid()}-{self.n}"
        self.a, self.b = f"t16espA-{tag}", f"t16espB-{tag}"
        self.path_a, self.path_b = f"/run/netns/{self.a}", f"/run/netns/{self.b}"
        self.vtep_a, self.vtep_b = f"10.231.{self.n}.1", f"10.231.{self.n}.2"
        self.subnets = {PLAIN: f"10.232.{self.n}", SECRET: f"10.234.{self.n}"}
        self.underlay_b = "ul0"
        self.plans = {
            name: NetworkPlan(
                id=f"{name}{self.n:03d}".ljust(12, "0"),
                name=name,
                subnet=f"{prefix}.0/24",
                gateway=f"{prefix}.254",
                internal=False,
                options={"encrypted": ""} if name == SECRET else {},
                vni=VNIS[name],
            )
            for name, prefix in self.subnets.items()
        }

    def host(self, network: str, node: str) -> str:
        return f"{self.subnets[network]}.{1 if node == 'a' else 2}"

    def up(self) -> None:
        for ns in (self.a, self.b):
            _run(["ip", "netns", "add", ns])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            # No IPv6 on the links: its router solicitations and DAD would cross the
            # overlay at moments of their own, in the captures and xfrm counters.
            sysctl = ["ip", "netns", "exec", ns, "sysctl", "-qw"]
            _run([*sysctl, "net.ipv6.conf.all.disable_ipv6=1"])
            _run([*sysctl, "net.ipv6.conf.default.disable_ipv6=1"])
        _run(["ip", "-n", self.a, "link", "add", "ul0", "type", "veth", "peer", "ulpeer"])
        _run(["ip", "-n", self.a, "link", "set", "ulpeer", "netns", self.b, "name", "ul0"])
        for node, ns, vtep in (("a", self.a, self.vtep_a), ("b", self.b, self.vtep_b)):
            _run(["ip", "-n", ns, "addr", "add", f"{vtep}/24", "dev", "ul0"])
            _run(["ip", "-n", ns, "link", "set", "ul0", "up"])
            driver = OverlayDriver(f"/run/netns/{ns}", vtep=vtep, port=PORT, underlay_mtu=1500)
            other = "b" if node == "a" else "a"
            other_vtep = self.vtep_b if node == "a" else self.vtep_a
            for name, plan in self.plans.items():
                mine = dataclasses.replace(plan, host_address=self.host(name, node))
                driver.create_network(mine)
                theirs = self.host(name, other)
                driver.set_peers(mine, [Peer(mac_of(theirs), theirs, other_vtep)])

    def down(self) -> None:
        for ns in (self.a, self.b):
            _run(["ip", "netns", "del", ns], check=False)

    def _sync(self, node: str, keys: list[bytes], primary: bytes) -> xfrm.SyncReport:
        """The sandbox manager's step for an encrypted overlay (filter, then IPsec)."""
        assert keys[0] == primary  # a keyring iterates primary first
        vtep, other, path = (
            (self.vtep_a, self.vtep_b, self.path_a)
            if node == "a"
            else (self.vtep_b, self.vtep_a, self.path_b)
        )
        wanted = EspWant(frozenset({VNIS[SECRET]}), frozenset({other}), tuple(keys), PORT)
        return manager.program_esp(wanted, vtep, path, PORT)

    def sync_a(self, keys: list[bytes], primary: bytes) -> xfrm.SyncReport:
        return self._sync("a", keys, primary)

    def sync_b(self, keys: list[bytes], primary: bytes) -> xfrm.SyncReport:
        return self._sync("b", keys, primary)

    def clear_a(self) -> xfrm.SyncReport:
        return manager.program_esp(NONE, self.vtep_a, self.path_a, PORT)

    def ping(self, count: int = 2, *, network: str = SECRET, from_b: bool = False) -> bool:
        """`count` echoes answered, waiting up to 2 s for each."""
        ns, target = (
            (self.b, self.host(network, "a")) if from_b else (self.a, self.host(network, "b"))
        )
        argv = ["ip", "netns", "exec", ns, "ping", "-c", str(count), "-i", "0.2"]
        return _run([*argv, "-W", "2", "-q", target], check=False).returncode == 0

    def diagnosis(self) -> str:
        """What a failed assertion shows: xfrm counters, SAs (no keys), neighbours."""
        lines = []
        for ns in (self.a, self.b):
            stats = {k: v for k, v in self.xfrm_stat(ns).items() if v}
            states = _run(["ip", "-n", ns, "-s", "xfrm", "state"], check=False).stdout
            neigh = _run(["ip", "-n", ns, "neigh"], check=False).stdout
            kept = [
                line for line in states.splitlines() if "proto esp" in line or "packets" in line
            ]
            lines += [f"{ns}: {stats}", *kept, neigh]
        return "\n".join(lines)

    def xfrm_stat(self, ns: str) -> dict[str, int]:
        text = _run(["ip", "netns", "exec", ns, "cat", "/proc/net/xfrm_stat"]).stdout
        return {name: int(value) for name, value in (line.split() for line in text.splitlines())}

    def mac(self, ns: str) -> bytes:
        info = json.loads(_run(["ip", "-n", ns, "-j", "link", "show", "ul0"]).stdout)
        return bytes.fromhex(info[0]["address"].replace(":", ""))


@pytest.fixture
def pair() -> Iterator[Pair]:
    made = Pair()
    try:
        made.up()
        yield made
    finally:
        made.down()


class Capture:
    """Counts, on an interface of a namespace, IPv4 ESP packets and VXLAN (UDP to
    `PORT`) per VNI."""

    def __init__(self, netns: str, ifname: str) -> None:
        with entered(netns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        self.sock.bind((ifname, 0))
        self.sock.settimeout(0.2)
        self.esp = 0
        self.vxlan = 0
        self.vnis: Counter[int] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                frame = self.sock.recv(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            if len(frame) < 34 or frame[12:14] != b"\x08\x00":
                continue
            ihl = (frame[14] & 0x0F) * 4
            proto = frame[23]
            if proto == 50:
                self.esp += 1
            elif proto == 17 and len(frame) >= 14 + ihl + 4:
                (dport,) = struct.unpack("!H", frame[14 + ihl + 2 : 14 + ihl + 4])
                if dport == PORT:
                    self.vxlan += 1
                    header = frame[14 + ihl + 8 : 14 + ihl + 16]
                    if len(header) == 8:
                        self.vnis[int.from_bytes(header[4:7], "big")] += 1

    def stop(self) -> tuple[int, int]:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()
        return self.esp, self.vxlan


@contextlib.contextmanager
def captured(pair: Pair) -> Iterator[Capture]:
    capture = Capture(pair.path_b, pair.underlay_b)
    try:
        yield capture
    finally:
        capture.stop()


def test_only_the_encrypted_networks_vxlan_is_esp_and_its_plain_vxlan_is_dropped(
    pair: Pair,
) -> None:
    secret, plain = VNIS[SECRET], VNIS[PLAIN]
    # Before: both networks are plain VXLAN on the wire (what the capture must tell apart).
    with captured(pair) as before:
        assert pair.ping(network=PLAIN) and pair.ping(network=SECRET), pair.diagnosis()
    before.stop()
    assert before.vnis[plain] > 0 and before.vnis[secret] > 0 and before.esp == 0, before.vnis

    # The filter alone (what a node whose IPsec cannot be programmed keeps: no keyring,
    # no ESP in its kernel): the encrypted network carries nothing, in clear or not;
    # the plain one is untouched.
    espfilter.apply([secret], PORT, pair.path_a)
    espfilter.apply([secret], PORT, pair.path_b)
    with captured(pair) as closed:
        assert not pair.ping(count=1), "the encrypted network sent clear text"
        assert pair.ping(network=PLAIN)
    closed.stop()
    out_dropped = espfilter.counters(pair.path_a)["plain_out_dropped"]
    print(f"\n[esp] filter without IPsec: {out_dropped} packets held back at A; {closed.vnis}")
    assert out_dropped > 0 and closed.vnis[secret] == 0 and closed.vnis[plain] > 0

    # Someone else's IPsec in A's namespace (reqid 7): no sync may touch it.
    foreign = (
        "xfrm state add src 10.233.0.1 dst 10.233.0.2 proto esp spi 0x2000 reqid 7 "
        f'mode transport aead "{esp.AEAD}" 0x{"11" * 20} {esp.ICV_BITS}\n'
        "xfrm policy add src 10.233.0.1/32 dst 10.233.0.2/32 proto udp dport 4789 dir out "
        "tmpl src 10.233.0.1 dst 10.233.0.2 proto esp reqid 7 mode transport\n"
    )
    _run(["ip", "-n", pair.a, "-batch", "-"], stdin=foreign)

    report = pair.sync_a([K1], K1)
    assert report.sas_added == 2 and report.policies_set == 1, report
    pair.sync_b([K1], K1)
    with captured(pair) as during:
        assert pair.ping(count=3), f"no traffic over the encrypted overlay:\n{pair.diagnosis()}"
        assert pair.ping(count=3, network=PLAIN), "the plain overlay broke"
        echoed = _tcp_exchange(pair, [b"x" * 1200] * 20, SECRET)
        echoed_plain = _tcp_exchange(pair, [b"y" * 1200] * 5, PLAIN)
    during.stop()
    print(
        f"\n[esp] underlay frames: {during.esp} ESP, VXLAN per VNI {dict(during.vnis)} "
        f"(plain {plain}, encrypted {secret})"
    )
    assert echoed == 20 and echoed_plain == 5
    assert during.esp > 0 and during.vnis[secret] == 0 and during.vnis[plain] > 0, during.vnis

    # Plain VXLAN with the encrypted network's VNI, put on the wire as a node without
    # the key would: dropped at B and counted; the same with the plain VNI is delivered
    # (so the injection itself works).
    dropped_before = espfilter.counters(pair.path_b)["plain_in_dropped"]
    received = {name: _UdpCounter(pair.path_b, pair.host(name, "b")) for name in VNIS}
    try:
        _inject(pair, SECRET, count=3)
        _inject(pair, PLAIN, count=3)
        time.sleep(0.5)
    finally:
        counts = {name: counter.stop() for name, counter in received.items()}
    dropped = espfilter.counters(pair.path_b)["plain_in_dropped"] - dropped_before
    print(f"\n[esp] injected plain VXLAN: delivered {counts}, dropped at B {dropped}")
    assert counts == {PLAIN: 3, SECRET: 0}
    assert dropped >= 3

    # The SAs A made for B are the ones B made for A, derived apart.
    sas_a = [sa for sa in xfrm.installed(pair.path_a)[0] if esp.is_ours(sa.reqid)]
    sas_b, _ = xfrm.installed(pair.path_b)
    assert {sa.spi for sa in sas_a} == {sa.spi for sa in sas_b}
    assert len(sas_a) == 2
    # Idempotent: a second sync changes nothing.
    assert not pair.sync_a([K1], K1).changed
    assert not pair.sync_b([K1], K1).changed
    # No encrypted network left: ours go (filter too), the foreign SA and policy stay.
    cleared = pair.clear_a()
    assert (cleared.sas_removed, cleared.policies_removed) == (2, 1), cleared
    sas_left, policies_left = xfrm.installed(pair.path_a)
    assert [(sa.spi, sa.reqid) for sa in sas_left] == [(0x2000, 7)]
    assert [(p.src, p.reqid) for p in policies_left] == [("10.233.0.1", 7)]
    tables = _run(["ip", "netns", "exec", pair.a, "nft", "list", "tables"]).stdout
    assert "meshplane_esp" not in tables


def _checksum(data: bytes) -> int:
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return int(~total & 0xFFFF)


def _ipv4_udp(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload  # no checksum
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0,
        ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed,
    )  # fmt: skip
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return header + udp


def _inject(pair: Pair, network: str, count: int) -> None:
    """`count` plain VXLAN frames with `network`'s VNI from A's underlay to B, each a
    UDP datagram from A's address on that network to B's, written straight onto the
    wire (AF_PACKET: past A's filter and IPsec, as another host would send it)."""
    src, dst = pair.host(network, "a"), pair.host(network, "b")
    inner = (
        bytes.fromhex(mac_of(dst).replace(":", ""))
        + bytes.fromhex(mac_of(src).replace(":", ""))
        + b"\x08\x00"
        + _ipv4_udp(src, dst, 40000, UDP_PORT, b"injected")
    )
    vxlan = struct.pack("!B3xI", 0x08, VNIS[network] << 8) + inner
    frame = (
        pair.mac(pair.b)
        + pair.mac(pair.a)
        + b"\x08\x00"
        + _ipv4_udp(pair.vtep_a, pair.vtep_b, 40001, PORT, vxlan)
    )
    with entered(pair.path_a):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    with sock:
        sock.bind(("ul0", 0))
        for _ in range(count):
            sock.send(frame)


def test_a_node_with_the_wrong_key_can_neither_send_nor_read(pair: Pair) -> None:
    pair.sync_a([K1], K1)
    pair.sync_b([WRONG], WRONG)
    with captured(pair) as wire:
        assert not pair.ping(count=2), "traffic passed between nodes with different keys"
        assert not pair.ping(count=2, from_b=True), "traffic passed with different keys"
    esp_seen, vxlan_seen = wire.stop()
    no_state_b = pair.xfrm_stat(pair.b)["XfrmInNoStates"]
    no_state_a = pair.xfrm_stat(pair.a)["XfrmInNoStates"]
    print(
        f"\n[esp] wrong key: {esp_seen} ESP on the wire, "
        f"unreadable at B {no_state_b}, at A {no_state_a}"
    )
    assert esp_seen > 0 and vxlan_seen == 0
    assert no_state_b > 0  # A's packets reached B, which has no SA to read them
    assert no_state_a > 0  # and B's packets reached A, which cannot read them either

    # B gets A's key inbound: A -> B is read now, B's answers (its primary) still not.
    pair.sync_b([WRONG, K1], WRONG)
    assert not pair.ping(count=1)
    # A gets B's key inbound too: each end reads the other, each still sends its own.
    pair.sync_a([K1, WRONG], K1)
    assert pair.ping(count=2), (
        f"inbound SAs of both keys on both ends did not carry traffic:\n{pair.diagnosis()}"
    )


def test_key_rotation_under_steady_traffic_loses_no_connection_and_no_message(
    pair: Pair,
) -> None:
    pair.sync_a([K1], K1)
    pair.sync_b([K1], K1)
    assert pair.ping(count=1)
    target = pair.host(SECRET, "b")
    server = _EchoServer(pair.path_b, target)
    udp = _UdpCounter(pair.path_b, target)
    with entered(pair.path_a):
        conn = socket.create_connection((target, ECHO_PORT), timeout=5)
        udp_out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # Each step of the rotation is a phase; the traffic thread counts the messages
    # that went through each (so every intermediate state carried some).
    phases = ["K1", "K2 installed", "A sends K2", "both send K2", "K1 removed"]
    per_phase = [0] * len(phases)
    phase = 0
    sent = echoed = datagrams = 0
    errors: list[BaseException] = []
    deadline = time.monotonic() + 60

    def traffic() -> None:
        nonlocal sent, echoed, datagrams
        try:
            while per_phase[-1] < 40 and sent < MAX_MESSAGES and time.monotonic() < deadline:
                message = f"{sent:06d}".encode()
                conn.sendall(message)
                answer = b""
                while len(answer) < len(message):
                    chunk = conn.recv(len(message) - len(answer))
                    assert chunk, "the connection closed"
                    answer += chunk
                assert answer == message
                sent += 1
                echoed += 1
                udp_out.sendto(message, (target, UDP_PORT))
                datagrams += 1
                per_phase[phase] += 1
                time.sleep(0.01)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    def step(until: int) -> None:
        # let the current phase carry a few messages first (bounded by the deadline)
        while per_phase[until - 1] < 10 and worker.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)

    worker = threading.Thread(target=traffic, daemon=True)
    started = time.monotonic()
    worker.start()
    try:
        step(1)
        pair.sync_a([K1, K2], K1)  # 1. the new key, inbound, everywhere
        pair.sync_b([K1, K2], K1)
        phase = 1
        step(2)
        pair.sync_a([K2, K1], K2)  # 2. A sends with K2 while B still sends with K1
        phase = 2
        step(3)
        pair.sync_b([K2, K1], K2)
        phase = 3
        step(4)
        pair.sync_a([K2], K2)  # 3. the old key goes
        pair.sync_b([K2], K2)
        phase = 4
        worker.join(timeout=60)
    finally:
        conn.close()
        udp_out.close()
    elapsed = time.monotonic() - started
    time.sleep(0.5)
    received = udp.stop()
    server.stop()
    print(
        f"\n[esp] rotation under traffic: {echoed}/{sent} TCP messages echoed on one "
        f"connection, {received}/{datagrams} UDP datagrams received, {elapsed:.1f} s; "
        f"per phase: {dict(zip(phases, per_phase, strict=True))}"
    )
    assert not errors, errors
    assert not worker.is_alive()
    assert echoed == sent > 0
    assert received == datagrams
    assert all(count >= 10 for count in per_phase[:-1]) and per_phase[-1] >= 40, per_phase
    for ns in (pair.a, pair.b):
        stats = pair.xfrm_stat(ns)
        assert not any(stats.values()), (ns, {k: v for k, v in stats.items() if v})
    # Only K2's SAs are left, and they carried traffic.
    sas_a, _ = xfrm.installed(pair.path_a)
    _, out_spi = esp.derive(K2, pair.vtep_a, pair.vtep_b)
    _, in_spi = esp.derive(K2, pair.vtep_b, pair.vtep_a)
    assert {sa.spi for sa in sas_a} == {out_spi, in_spi}


def _tcp_exchange(pair: Pair, messages: list[bytes], network: str) -> int:
    target = pair.host(network, "b")
    server = _EchoServer(pair.path_b, target)
    try:
        with entered(pair.path_a):
            conn = socket.create_connection((target, ECHO_PORT), timeout=10)
        done = 0
        with conn:
            conn.settimeout(10)
            for message in messages:
                conn.sendall(message)
                answer = b""
                while len(answer) < len(message):
                    chunk = conn.recv(65536)
                    assert chunk
                    answer += chunk
                assert answer == message
                done += 1
        return done
    finally:
        server.stop()


class _EchoServer:
    def __init__(self, netns: str, address: str) -> None:
        with entered(netns):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((address, ECHO_PORT))
        self.sock.listen(4)
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        conn.settimeout(0.5)
        with conn:
            while not self._stop.is_set():
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                conn.sendall(data)

    def stop(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(timeout=5)


class _UdpCounter:
    def __init__(self, netns: str, address: str) -> None:
        with entered(netns):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.bind((address, UDP_PORT))
        self.sock.settimeout(0.2)
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sock.recv(2048)
            except TimeoutError:
                continue
            except OSError:
                return
            self.count += 1

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()
        return self.count
