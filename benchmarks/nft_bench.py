"""L4 benchmark, nftables path: wrk straight to a backend against wrk through the nftables backend.

One run, three paths to the same nginx (one worker, `return 200`), all from the
same wrk (one thread, `--connections` keep-alive connections):

- direct: client namespace -> routed by the node namespace -> nginx;
- nft vip: the same, addressed to a VIP that the nftables backend DNATs;
- nft published: addressed to the node's own address on a published port.

The client, node and reals are network namespaces made here (10.88.x inside
them only) and removed at the end; nginx and wrk are pinned (`taskset`) to
different CPUs; the paths are timed in alternating rounds so that a shared
machine's drift falls on all alike, after one untimed warm-up each. The
backend's table stays loaded throughout, so "direct" crosses the same node and
its conntrack too: the difference measured is the DNAT itself. Reported:
requests per second (mean and range over rounds) and the ratio to direct.
The issue's target for the nftables path is >= 0.9x direct.

    sudo .venv/bin/python benchmarks/nft_bench.py [--seconds 3] [--rounds 5]

Needs root, nft, nginx, wrk, taskset. Runtime: about 3 x rounds x seconds + 5 s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lb.nft import NftablesBackend
from lb.table import ANY_ADDRESS, PutReal, PutService, Real, VirtualKey
from tests.helpers.netns import Lab, Netns, unavailable

NGINX = """worker_processes 1; daemon off; pid {dir}/nginx.pid; error_log {dir}/error.log;
events {{ worker_connections 1024; }}
http {{ access_log off; server {{ listen 10.88.2.2:8000; location / {{ return 200 "ok\\n"; }} }} }}
"""
REAL = Real("10.88.2.2", 8000)
PATHS = {
    "direct": "http://10.88.2.2:8000/",
    "nft vip": "http://10.88.100.1/",
    "nft published": "http://10.88.1.1:30080/",
}


def wrk(ns: Netns, url: str, seconds: int, connections: int, cpu: int) -> float:
    done = ns.run(
        ["taskset", "-c", str(cpu), "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", url],
        timeout=seconds + 30,
    )
    found = re.search(r"Requests/sec:\s+([\d.]+)", done.stdout)
    if found is None or "Non-2xx" in done.stdout or "Socket errors" in done.stdout:
        raise RuntimeError(f"wrk {url}: {done.stdout}")
    return float(found[1])


async def run(args: argparse.Namespace) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    server_cpu, client_cpu = cpus[0], cpus[-1]
    with Lab("mpnb") as lab, tempfile.TemporaryDirectory() as tmp:
        node, client, reals = (lab.namespace(role) for role in ("node", "client", "reals"))
        lab.veth(client, "eth0", node, "c0")
        client.add_address("eth0", "10.88.1.2/24")
        node.add_address("c0", "10.88.1.1/24")
        client.ip("route", "add", "default", "via", "10.88.1.1")
        lab.veth(node, "r0", reals, "eth0")
        node.add_address("r0", "10.88.2.1/24")
        reals.add_address("eth0", "10.88.2.2/24")
        reals.ip("route", "add", "default", "via", "10.88.2.1")
        node.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])  # for the direct path too
        conf = Path(tmp) / "nginx.conf"
        conf.write_text(NGINX.format(dir=tmp))
        nginx = reals.popen(["taskset", "-c", str(server_cpu), "nginx", "-c", str(conf)])
        backend = NftablesBackend(netns=node.name)
        try:
            await asyncio.sleep(0.5)
            await backend.start({})
            vip = VirtualKey("tcp", "10.88.100.1", 80)
            published = VirtualKey("tcp", ANY_ADDRESS, 30080)
            await backend.apply(
                [
                    PutService(vip),
                    PutReal(vip, REAL, 1),
                    PutService(published),
                    PutReal(published, REAL, 1),
                ]
            )
            for url in PATHS.values():
                wrk(client, url, 1, args.connections, client_cpu)
            results: dict[str, list[float]] = {name: [] for name in PATHS}
            for _ in range(args.rounds):
                for name, url in PATHS.items():
                    results[name].append(
                        wrk(client, url, args.seconds, args.connections, client_cpu)
                    )
        finally:
            await backend.close()
            nginx.terminate()
            nginx.wait(10)
    direct = sum(results["direct"]) / len(results["direct"])
    print(f"{'path':15} {'req/s':>9} {'range':>15} {'x direct':>9}")
    for name, values in results.items():
        mean = sum(values) / len(values)
        print(f"{name:15} {mean:9.0f} {min(values):7.0f}-{max(values):<7.0f} {mean / direct:9.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=3, choices=range(1, 31))
    parser.add_argument("--rounds", type=int, default=5, choices=range(1, 21))
    parser.add_argument("--connections", type=int, default=32, choices=range(1, 257))
    args = parser.parse_args()
    reason = unavailable()
    missing = [t for t in ("nft", "nginx", "wrk", "taskset") if shutil.which(t) is None]
    if reason or missing:
        sys.exit(f"cannot run: {reason or 'not installed: ' + ', '.join(missing)}")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
