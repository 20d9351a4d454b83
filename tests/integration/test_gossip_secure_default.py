"""Gossip secure by default (issue 18): real agents on loopback, a real capture.

Two fresh agents given nothing about gossip security beyond `--join` and the
token `mesh join-token` printed form an encrypted cluster: tcpdump on the
gossip port (the host's loopback, filtered in the kernel to this test's port)
sees the UDP packets and the TCP push-pull, and not one member name in them.
The same capture of an `--insecure-gossip` pair does show the names: the
capture sees what it claims not to. A third agent with a wrong token is
refused (its packets fail to authenticate), counted on the seed, and never
becomes a member.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gossip import join_token
from gossip.security import ENCRYPTED
from tests.helpers.agent import REPO, AgentProcess, free_port, members
from tests.integration.test_agent_startup import refused
from tests.integration.test_gossip_cluster import wait_until

JOIN_BOUND = 20.0  # seconds for a join on a loaded machine; it takes about one


def needs_capture() -> None:
    if os.geteuid() != 0:
        pytest.skip("a capture on loopback needs root")
    if shutil.which("tcpdump") is None:
        pytest.skip("tcpdump is not installed (.ci/run installs it)")


@dataclass
class Payloads:
    """The transport payloads a capture holds, by protocol."""

    udp: list[bytes] = field(default_factory=list)
    tcp: list[bytes] = field(default_factory=list)

    def holds(self, name: str) -> dict[str, bool]:
        needle = name.encode()
        return {
            "udp": any(needle in p for p in self.udp),
            # A name may straddle two segments of one stream: look in the joined bytes too.
            "tcp": needle in b"".join(self.tcp) or any(needle in p for p in self.tcp),
        }


def payloads(path: Path) -> Payloads:
    """UDP and TCP payloads of a classic pcap of Ethernet frames (Linux `lo`)."""
    data = path.read_bytes()
    found = Payloads()
    if len(data) < 24:
        return found
    order = "<" if struct.unpack("<I", data[:4])[0] in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    assert struct.unpack(order + "I", data[20:24])[0] == 1, "not an Ethernet capture"
    offset = 24
    while offset + 16 <= len(data):
        caplen = struct.unpack(order + "I", data[offset + 8 : offset + 12])[0]
        frame = data[offset + 16 : offset + 16 + caplen]
        offset += 16 + caplen
        if len(frame) < 34 or frame[12:14] != b"\x08\x00":
            continue
        ip = frame[14:]
        header = (ip[0] & 0x0F) * 4
        total = struct.unpack("!H", ip[2:4])[0]
        segment = ip[header:total]
        if ip[9] == 17:
            found.udp.append(segment[8:])
        elif ip[9] == 6 and len(segment) >= 20:
            body = segment[(segment[12] >> 4) * 4 :]
            if body:
                found.tcp.append(body)
    return found


@contextmanager
def capture(port: int, folder: Path) -> Iterator[Path]:
    """tcpdump on loopback, UDP and TCP of `port` only; the pcap is whole after the block."""
    dump = folder / f"gossip-{port}.pcap"
    # -s 0: whole packets; --immediate-mode and -U: nothing waits in a buffer past SIGINT
    argv = ["tcpdump", "-i", "lo", "-n", "-U", "--immediate-mode", "-s", "0",
            "-w", str(dump), f"port {port}"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()  # "listening on lo, ..." once it captures
        assert b"listening" in line, line
        yield dump
        time.sleep(0.3)  # the last packets' way through the kernel
    finally:
        proc.send_signal(signal.SIGINT)  # tcpdump writes what it has and exits
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def mesh_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mesh", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        cwd=REPO,
    )


def print_token(data_dir: Path) -> str:
    done = mesh_cli("join-token", "--data-dir", str(data_dir))
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def node(root: Path, name: str, address: str, port: int, *flags: str) -> AgentProcess:
    """An agent with nothing about gossip security but `flags` (no shared test key)."""
    return AgentProcess(
        root / name,
        node_name=name,
        publish_address=address,
        shared_key=False,
        extra=["--advertise", f"{address}:{port}", "--gossip-profile", "local", *flags],
    )


def drops(agent: AgentProcess) -> dict[str, int]:
    answer: dict[str, int] = agent.request("GET", "/v1/gossip")[1]["drops"]
    return answer


@pytest.mark.parametrize("secure", [True, False], ids=["by-default", "insecure-gossip"])
def test_two_fresh_agents_and_the_printed_token_form_an_encrypted_cluster(
    tmp_path: Path, secure: bool
) -> None:
    needs_capture()
    port = free_port()
    # Names no packet holds by chance: found in a capture, they were sent in clear.
    seed_name, joiner_name = (f"{role}-{secrets.token_hex(6)}" for role in ("seed", "joiner"))
    insecure = () if secure else ("--insecure-gossip",)
    started = []
    with tempfile.TemporaryDirectory(prefix="gossip-capture-") as folder:
        try:
            with capture(port, Path(folder)) as dump:
                seed = node(tmp_path, seed_name, "127.0.0.2", port, *insecure)
                started.append(seed.start())
                if secure:
                    token = print_token(seed.data_dir)
                    assert token.startswith("mesh1.")
                    joining = ("--token", token)
                else:
                    joining = insecure
                joiner = node(
                    tmp_path,
                    joiner_name,
                    "127.0.0.3",
                    port,
                    "--join",
                    f"127.0.0.2:{port}",
                    *joining,
                )
                begun = time.monotonic()
                started.append(joiner.start())
                up = time.monotonic() - begun
                both = {seed_name: "alive", joiner_name: "alive"}
                took = wait_until(
                    lambda: all(members(a) == both for a in started), JOIN_BOUND, "joined"
                )
                time.sleep(2.0)  # probes, acks and a periodic push-pull or two
            seen = payloads(dump)
        finally:
            for agent in started:
                agent.stop()
    mode = "encrypted" if secure else "plaintext"
    udp_bytes, tcp_bytes = sum(map(len, seen.udp)), sum(map(len, seen.tcp))
    print(
        f"\n{mode}: the joiner answered in {up:.2f}s, both saw both alive {took:.2f}s later; "
        f"captured {len(seen.udp)} UDP packets "
        f"({udp_bytes} B) and {len(seen.tcp)} TCP segments with data ({tcp_bytes} B)"
    )
    # The capture saw gossip of both kinds: the join's push-pull runs over TCP.
    assert seen.udp and seen.tcp
    for name in (seed_name, joiner_name):
        held = seen.holds(name)
        print(f"{mode}: {name} in UDP: {held['udp']}, in TCP: {held['tcp']}")
        if secure:
            assert held == {"udp": False, "tcp": False}, f"{name} was sent in clear"
        else:  # the control: the capture does show what is sent in clear
            assert held == {"udp": True, "tcp": True}
    if secure:
        assert all(p[:1] == bytes([ENCRYPTED]) for p in seen.udp), "a UDP packet not sealed"
        assert (tmp_path / joiner_name / "keyring.json").exists()  # stored by the joiner


def test_a_wrong_token_is_refused_and_counted(tmp_path: Path) -> None:
    port = free_port()
    seed = node(tmp_path, "seed", "127.0.0.2", port).start()
    agents = [seed]
    try:
        token = print_token(seed.data_dir)
        joiner = node(tmp_path, "joiner", "127.0.0.3", port, "--join", f"127.0.0.2:{port}")
        joiner.env = {"MESH_JOIN_TOKEN": token}  # the variable, as a unit or a pod gives it
        agents.append(joiner.start())
        both = {"seed": "alive", "joiner": "alive"}
        wait_until(lambda: all(members(a) == both for a in agents), JOIN_BOUND, "joined")
        before = drops(seed).get("unauthenticated", 0)
        # The right format and label, another key: what a stale or foreign token holds.
        wrong = join_token.encode([os.urandom(32)], join_token.decode(token).label)
        stranger = node(
            tmp_path, "stranger", "127.0.0.4", port, "--join", f"127.0.0.2:{port}", "--token", wrong
        )
        agents.append(stranger.start())
        wait_until(
            lambda: drops(seed).get("unauthenticated", 0) > before, JOIN_BOUND, "refusals counted"
        )
        time.sleep(3.0)  # the stranger keeps trying, with back-off; it must never get in
        counted = drops(seed).get("unauthenticated", 0) - before
        print(f"\nthe stranger's packets refused by the seed: {counted} (unauthenticated)")
        assert counted > 0
        assert members(seed) == both and members(joiner) == both
        assert members(stranger) == {"stranger": "alive"}
    finally:
        for agent in agents:
            agent.stop()


def test_join_without_a_key_and_a_malformed_token_are_start_errors(tmp_path: Path) -> None:
    port = free_port()
    code, lines, _ = refused(node(tmp_path, "a", "127.0.0.2", port, "--join", "127.0.0.3"))
    print(f"\n--join without a key: exit {code}: {lines[-1]}")
    assert code == 1
    for option in ("--token", "MESH_JOIN_TOKEN", "--token-file", "--keyring", "--insecure-gossip"):
        assert option in lines[-1]
    assert not (tmp_path / "a" / "keyring.json").exists()
    good = join_token.encode([os.urandom(32)])
    for bad in ("mesh1.not-a-token", good[:-4], "secret", good.replace("mesh1.", "mesh9.")):
        args = ("--join", "127.0.0.3", "--token", bad)
        code, lines, _ = refused(node(tmp_path, "b", "127.0.0.2", port, *args))
        assert code == 2 and lines[-1].startswith("mesh agent: --token: "), lines
        assert bad not in lines[-1]  # the token is a secret: never echoed
    print(f"a malformed token: exit {code}: {lines[-1]}")


def test_a_first_node_keeps_its_keyring_across_restarts_and_insecure_warns(
    tmp_path: Path,
) -> None:
    port = free_port()
    first = node(tmp_path, "a", "127.0.0.2", port).start()
    try:
        token = print_token(first.data_dir)
        gossip = first.request("GET", "/v1/gossip")[1]
        assert gossip["encrypted"] and gossip["verify_incoming"] and gossip["verify_outgoing"]
    finally:
        first.stop()
    keyring = first.data_dir / "keyring.json"
    assert oct(keyring.stat().st_mode & 0o777) == "0o600"
    again = node(tmp_path, "a", "127.0.0.2", port).start()
    try:
        assert print_token(again.data_dir) == token  # the same keys: reused, not remade
    finally:
        again.stop()
    plain = node(tmp_path, "p", "127.0.0.3", port, "--insecure-gossip").start()
    try:
        assert plain.request("GET", "/v1/gossip")[1]["encrypted"] is False
    finally:
        plain.stop()
    warning = [line for line in plain.log().splitlines() if "event=gossip_insecure" in line]
    assert warning and "level=warning" in warning[0], plain.log()
    assert not (plain.data_dir / "keyring.json").exists()
