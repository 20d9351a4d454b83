"""Overlay benchmark: TCP throughput over the overlay (VXLAN) against a direct veth.

One run, the same two sandbox namespaces, three paths side by side:

- direct veth: a veth pair made here straight from sandbox 1 to sandbox 2
  (10.211.0.1/30 -- .2): the fastest two namespaces can talk;
- underlay: node 1 to node 2 over the underlay (node -> switch namespace ->
  node), no encapsulation: what the overlay rides on;
- overlay: sandbox 1 on node 1 to sandbox 2 on node 2 on one overlay network
  (veth -> bridge -> VXLAN -> underlay -> VXLAN -> bridge -> veth), with the
  static peers the driver programs.

The nodes, switch and sandboxes are network namespaces made by the overlay
driver's test lab (tests/netdrv/underlay.py; 10.x inside them only), removed at
the end. Each path is timed in alternating rounds (one untimed warm-up each) so
a shared machine's drift falls on all alike; the client and server are pinned
to different CPUs. The tool is iperf3 (one TCP stream, `-J`) when installed,
else a bounded raw-socket bench (a sender writing 256 KiB buffers for the given
seconds, a receiver counting bytes; both separate Python processes).
Reported: Gbit/s (mean, range over rounds) and the ratio to the direct veth.
The issue's goal for the overlay is >= 0.8x direct.

    sudo .venv/bin/python benchmarks/overlay_bench.py [--seconds 3] [--rounds 3]

Needs root, ip, nsenter, taskset; iperf3 optional (Debian: apt-get install iperf3).
Runtime: about 3 x (rounds + 1) x seconds + 10 s; --seconds at most 30, --rounds at most 10.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.netdrv.lab import run, skip_reason
from tests.netdrv.underlay import Underlay, finish

PORT = 5201
DIRECT = ("10.211.0.1", "10.211.0.2")

SINK = """
import socket, sys
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((sys.argv[1], int(sys.argv[2])))
server.listen(1)
server.settimeout(float(sys.argv[3]))
print("ready", flush=True)
conn, _ = server.accept()
conn.settimeout(float(sys.argv[3]))
total = 0
while chunk := conn.recv(1 << 18):
    total += len(chunk)
print(total, flush=True)
"""

SOURCE = """
import socket, sys, time
seconds = float(sys.argv[3])
buffer = b"x" * (1 << 18)
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as conn:
    started = time.monotonic()
    deadline = started + seconds
    while time.monotonic() < deadline:
        conn.sendall(buffer)
    conn.shutdown(socket.SHUT_WR)
    conn.recv(1)
    print(time.monotonic() - started, flush=True)
"""


@dataclass
class Path_:
    name: str
    client: str  # the namespace path the client runs in
    server: str
    address: str  # the server's


def nsenter(path: str, cpu: int, argv: list[str]) -> list[str]:
    return ["nsenter", f"--net={path}", "--", "taskset", "-c", str(cpu), *argv]


def iperf3(path: Path_, seconds: int, cpus: tuple[int, int]) -> float:
    """Gbit/s received by the server over one TCP stream."""
    server = subprocess.Popen(
        nsenter(path.server, cpus[0], ["iperf3", "-s", "-1", "-B", path.address, "-p", str(PORT)]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(50):  # until it listens
            done = subprocess.run(
                ["nsenter", f"--net={path.server}", "--", "ss", "-ltnH", f"sport = :{PORT}"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            if done.stdout.strip():
                break
            time.sleep(0.1)
        client = subprocess.run(
            nsenter(
                path.client,
                cpus[1],
                ["iperf3", "-c", path.address, "-p", str(PORT), "-t", str(seconds), "-J"],
            ),
            capture_output=True,
            text=True,
            timeout=seconds + 30,
        )
        if client.returncode != 0:
            raise RuntimeError(f"iperf3 {path.name}: {client.stdout[-500:]} {client.stderr}")
        report = json.loads(client.stdout)
        return float(report["end"]["sum_received"]["bits_per_second"]) / 1e9
    finally:
        finish(server)


def sockets(path: Path_, seconds: int, cpus: tuple[int, int]) -> float:
    """Gbit/s counted by a raw-socket receiver (no iperf3)."""
    python = sys.executable
    sink = subprocess.Popen(
        nsenter(
            path.server, cpus[0], [python, "-c", SINK, path.address, str(PORT), str(seconds + 20)]
        ),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert sink.stdout is not None
        if sink.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the receiver in {path.name} did not start")
        source = subprocess.run(
            nsenter(
                path.client, cpus[1], [python, "-c", SOURCE, path.address, str(PORT), str(seconds)]
            ),
            capture_output=True,
            text=True,
            timeout=seconds + 30,
        )
        if source.returncode != 0:
            raise RuntimeError(f"sender {path.name}: {source.stderr}")
        elapsed = float(source.stdout)
        received = int(sink.stdout.readline())
        return received * 8 / elapsed / 1e9
    finally:
        finish(sink)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tool", choices=["auto", "iperf3", "sockets"], default="auto")
    args = parser.parse_args()
    if not 1 <= args.seconds <= 30 or not 1 <= args.rounds <= 10:
        parser.error("--seconds is 1-30, --rounds 1-10")
    reason = skip_reason()
    if reason:
        print(f"cannot run: {reason}")
        return 2
    tool = args.tool
    if tool == "auto":
        tool = "iperf3" if shutil.which("iperf3") else "sockets"
    measure = iperf3 if tool == "iperf3" else sockets
    allowed = sorted(os.sched_getaffinity(0))
    cpus = (allowed[0], allowed[-1])
    started = time.monotonic()
    underlay = Underlay(2)
    try:
        net = underlay.network(1)
        one, two = (underlay.task(node, net, 10 + node.index) for node in underlay.nodes)
        underlay.set_all_peers(net, [one, two])
        # the direct veth, straight between the same two sandboxes
        run(["ip", "-n", os.path.basename(one.path), "link", "add", "direct0", "type", "veth",
             "peer", "name", "direct1", "netns", os.path.basename(two.path)])  # fmt: skip
        for path, device, address in ((one.path, "direct0", DIRECT[0]),
                                      (two.path, "direct1", DIRECT[1])):  # fmt: skip
            name = os.path.basename(path)
            run(["ip", "-n", name, "addr", "add", f"{address}/30", "dev", device])
            run(["ip", "-n", name, "link", "set", device, "up"])
        node_one, node_two = underlay.nodes
        paths = [
            Path_("direct veth", one.path, two.path, DIRECT[1]),
            Path_("underlay", node_one.lab.node_path, node_two.lab.node_path, node_two.vtep),
            Path_("overlay", one.path, two.path, two.ep.address),
        ]
        mtu = run(["ip", "-n", os.path.basename(one.path), "-o", "link", "show", "eth0"])
        results: dict[str, list[float]] = {p.name: [] for p in paths}
        for path in paths:  # warm-up, untimed
            measure(path, 1, cpus)
        for _ in range(args.rounds):
            for path in paths:
                results[path.name].append(measure(path, args.seconds, cpus))
    finally:
        underlay.close()
    direct = sum(results["direct veth"]) / len(results["direct veth"])
    print(
        f"TCP throughput, one stream, {tool}, server on CPU {cpus[0]}, client on CPU "
        f"{cpus[1]}, {args.seconds} s x {args.rounds} alternating rounds; x = ratio to "
        "the direct veth"
    )
    print(f"{'path':<14}{'Gbit/s':>9}{'range':>15}{'x':>7}")
    print("-" * 45)
    for name, values in results.items():
        mean = sum(values) / len(values)
        spread = f"{min(values):.2f}-{max(values):.2f}"
        print(f"{name:<14}{mean:>9.2f}{spread:>15}{mean / direct:>7.2f}")
    overlay_mtu = mtu.stdout.split(" mtu ")[1].split()[0]
    print(f"- overlay MTU inside the sandbox: {overlay_mtu} (underlay 1500 - 50)")
    print(f"- total {time.monotonic() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
