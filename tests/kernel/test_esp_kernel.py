"""Encrypted overlay IPsec on a real kernel: `mesh.sandbox.xfrm.sync_pairs` between two nodes.

Needs a kernel with xfrm ESP and `rfc4106(gcm(aes))` (this machine's has neither:
`test_esp_vm.py` runs this file inside the stock-kernel VM, in one pytest call);
skipped, saying why, anywhere else.

Each test makes two node namespaces joined by a veth underlay (10.231.x.1 and
10.231.x.2) and a real VXLAN device in each (VNI 4242, dstport 4789, local/remote
the two VTEPs) carrying the overlay 10.232.x.0/24. A raw AF_PACKET socket on node
B's underlay veth counts what crosses the wire. Everything is removed at the end,
also after a failure (deleting a namespace takes its links and its xfrm state).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from mesh.core.netns import entered
from mesh.sandbox import esp, xfrm
from mesh.sandbox.names import mac_of

pytestmark = [pytest.mark.root, pytest.mark.slow]

K1, K2, WRONG = b"\x01" * 16, b"\x02" * 32, b"\x03" * 16
PORT, VNI = 4789, 4242
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
    """Nodes A and B, an underlay veth between them, VXLAN over it."""

    n: int = field(default_factory=lambda: next(_counter) % 200)

    def __post_init__(self) -> None:
        tag = f"{os.getpid()}-{self.n}"
        self.a, self.b = f"t16espA-{tag}", f"t16espB-{tag}"
        self.path_a, self.path_b = f"/run/netns/{self.a}", f"/run/netns/{self.b}"
        self.vtep_a, self.vtep_b = f"10.231.{self.n}.1", f"10.231.{self.n}.2"
        self.ov_a, self.ov_b = f"10.232.{self.n}.1", f"10.232.{self.n}.2"
        self.underlay_b = "ul0"

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
        mtu = 1500 - 50 - esp.ESP_OVERHEAD
        for ns, vtep, remote, overlay, peer in (
            (self.a, self.vtep_a, self.vtep_b, self.ov_a, self.ov_b),
            (self.b, self.vtep_b, self.vtep_a, self.ov_b, self.ov_a),
        ):
            _run(["ip", "-n", ns, "addr", "add", f"{vtep}/24", "dev", "ul0"])
            _run(["ip", "-n", ns, "link", "set", "ul0", "up"])
            _run(
                [
                    *("ip", "-n", ns, "link", "add", "vx0", "address", mac_of(overlay)),
                    *("type", "vxlan", "id", str(VNI), "dstport", str(PORT)),
                    *("local", vtep, "remote", remote, "dev", "ul0"),
                ]
            )
            _run(["ip", "-n", ns, "link", "set", "vx0", "mtu", str(mtu), "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{overlay}/24", "dev", "vx0"])
            # A static neighbour, as the overlay driver programs them: no ARP across
            # the overlay, so what passes or fails here is the IPsec alone (a
            # neighbour that failed to resolve while the keys differed would not).
            neigh = ["ip", "-n", ns, "neigh", "replace", peer, "lladdr", mac_of(peer)]
            _run([*neigh, "dev", "vx0", "nud", "permanent"])

    def down(self) -> None:
        for ns in (self.a, self.b):
            _run(["ip", "netns", "del", ns], check=False)

    def sync_a(self, keys: list[bytes], primary: bytes) -> xfrm.SyncReport:
        return xfrm.sync_pairs(self.vtep_a, [self.vtep_b], keys, primary, PORT, self.path_a)

    def sync_b(self, keys: list[bytes], primary: bytes) -> xfrm.SyncReport:
        return xfrm.sync_pairs(self.vtep_b, [self.vtep_a], keys, primary, PORT, self.path_b)

    def ping(self, count: int = 2, *, from_b: bool = False) -> bool:
        """`count` echoes answered, waiting up to 2 s for each."""
        ns, target = (self.b, self.ov_a) if from_b else (self.a, self.ov_b)
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


@pytest.fixture
def pair() -> Iterator[Pair]:
    made = Pair()
    try:
        made.up()
        yield made
    finally:
        made.down()


class Capture:
    """Counts, on an interface of a namespace, IPv4 ESP packets and UDP to `PORT`."""

    def __init__(self, netns: str, ifname: str) -> None:
        with entered(netns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        self.sock.bind((ifname, 0))
        self.sock.settimeout(0.2)
        self.esp = 0
        self.vxlan = 0
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


def test_the_underlay_carries_only_esp_and_each_end_derives_the_others_sas(pair: Pair) -> None:
    # Before: plain VXLAN crosses the wire (so the capture can see what it must not).
    with captured(pair) as before:
        assert pair.ping(), "plain VXLAN between the nodes does not work at all"
    esp_before, vxlan_before = before.stop()
    assert vxlan_before > 0 and esp_before == 0, (esp_before, vxlan_before)

    # Someone else's IPsec in A's namespace (reqid 7): no sync may touch it.
    foreign = (
        "xfrm state add src 10.233.0.1 dst 10.233.0.2 proto esp spi 0x2000 reqid 7 "
        f'mode transport aead "{esp.AEAD}" 0x{"11" * 20} {esp.ICV_BITS}\n'
        "xfrm policy add src 10.233.0.1/32 dst 10.233.0.2/32 proto udp dport 4789 dir out "
        "tmpl src 10.233.0.1 dst 10.233.0.2 proto esp reqid 7 mode transport\n"
    )
    _run(["ip", "-n", pair.a, "-batch", "-"], stdin=foreign)

    report = pair.sync_a([K1], K1)
    # Only A encrypts: B's plain VXLAN is refused at A (its policy needs ESP), and
    # whatever A sends is ESP that B has no SA for.
    assert not pair.ping(count=1, from_b=True), "plain VXLAN reached A and was answered"
    refused = {k: v for k, v in pair.xfrm_stat(pair.a).items() if k.startswith("XfrmIn") and v}
    print(f"\n[esp] A refused B's plain VXLAN: {refused}")
    assert refused, "A took plain VXLAN from B although its policy requires ESP"
    assert report.sas_added == 2 and report.policies_set == 2, report

    pair.sync_b([K1], K1)
    with captured(pair) as during:
        assert pair.ping(count=3), "no traffic over the encrypted overlay"
        echoed = _tcp_exchange(pair, [b"x" * 1200] * 20)
    esp_seen, vxlan_seen = during.stop()
    print(f"\n[esp] underlay frames: {esp_seen} ESP, {vxlan_seen} plain VXLAN")
    assert echoed == 20
    assert esp_seen > 0 and vxlan_seen == 0, (esp_seen, vxlan_seen)

    # The SAs A made for B are the ones B made for A, derived apart.
    sas_a = [sa for sa in xfrm.installed(pair.path_a)[0] if esp.is_ours(sa.reqid)]
    sas_b, _ = xfrm.installed(pair.path_b)
    assert {sa.spi for sa in sas_a} == {sa.spi for sa in sas_b}
    assert len(sas_a) == 2
    # Idempotent: a second sync changes nothing.
    assert not pair.sync_a([K1], K1).changed
    assert not pair.sync_b([K1], K1).changed
    # No peer left: ours go, the foreign SA and policy stay.
    cleared = xfrm.clear(pair.path_a)
    assert (cleared.sas_removed, cleared.policies_removed) == (2, 2), cleared
    sas_left, policies_left = xfrm.installed(pair.path_a)
    assert [(sa.spi, sa.reqid) for sa in sas_left] == [(0x2000, 7)]
    assert [(p.src, p.reqid) for p in policies_left] == [("10.233.0.1", 7)]


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
    server = _EchoServer(pair.path_b, pair.ov_b)
    udp = _UdpCounter(pair.path_b, pair.ov_b)
    with entered(pair.path_a):
        conn = socket.create_connection((pair.ov_b, ECHO_PORT), timeout=5)
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
                udp_out.sendto(message, (pair.ov_b, UDP_PORT))
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


def _tcp_exchange(pair: Pair, messages: list[bytes]) -> int:
    server = _EchoServer(pair.path_b, pair.ov_b)
    try:
        with entered(pair.path_a):
            conn = socket.create_connection((pair.ov_b, ECHO_PORT), timeout=10)
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
