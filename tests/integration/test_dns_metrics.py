"""DNS families of `GET /metrics` from an agent with 2 DNS workers: counts match what dig sent.

A known mix goes to the agent's DNS port with dig (one dig process per batch,
a fresh source port per query, so the kernel spreads them over the agent's
listener and both workers'): A, AAAA and SRV of a mesh service, a mesh name
that does not exist (NXDOMAIN), and names the mesh does not own, forwarded to
a fake upstream on loopback. The parsed scrape must show each count, summed
over the three processes, within 1 %.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.agent import AgentProcess
from tests.helpers.dns_upstream import FakeUpstream
from tests.integration.test_dns_agent import setup_web
from tests.integration.test_metrics import scrape, wait_for

#: queries of each kind (each name asked this often: the repeats are cache hits)
EACH = 150
FORWARDED = 60  # distinct names: each is one upstream attempt, whichever process asks


class UpstreamAgent(AgentProcess):
    """An agent whose only upstream is `upstream` (not the closed port 9 of every test agent)."""

    def __init__(self, data_dir: Path, upstream: str, **kw: object) -> None:
        super().__init__(data_dir, **kw)  # type: ignore[arg-type]
        self.upstream = upstream

    def argv(self) -> list[str]:
        return [self.upstream if arg == "127.0.0.1:9" else arg for arg in super().argv()]


def dig_batch(port: int, lines: list[str], path: Path) -> str:
    path.write_text("".join(f"{line}\n" for line in lines))
    done = subprocess.run(
        ["dig", "@127.0.0.1", "-p", str(port), "+tries=1", "+timeout=3", "-f", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stdout


def family(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> dict:
    return {labels: value for (sample, labels), value in samples.items() if sample == name}


@pytest.mark.skipif(shutil.which("dig") is None, reason="needs dig")
def test_dns_queries_forwards_cache_and_latency_match_the_mix(tmp_path: Path) -> None:
    names = {f"ext{i}.example": ["192.0.2.7"] for i in range(FORWARDED)}
    with FakeUpstream(names) as upstream:
        address = f"127.0.0.1:{upstream.port}"
        agent = UpstreamAgent(tmp_path / "agent", address, extra=["--dns-workers", "2"])
        agent.start()
        try:
            assert wait_for(lambda: agent.log().count("dns_worker_ready") == 2, 20), agent.log()
            setup_web(agent)
            spec = {"name": "api", "networks": ["front"], "ports": [{"target_port": 80}]}
            status, body = agent.request("POST", "/v1/services", spec)
            assert status == 201, body  # _80._tcp.api: a service's port, NOERROR
            time.sleep(1.0)  # the workers have applied the feed's changes
            before = scrape(agent)
            mix = (
                ["web A"] * EACH
                + ["web AAAA"] * EACH
                + ["_80._tcp.api SRV"] * EACH
                + ["tasks.nope A"] * EACH
                + [f"ext{i}.example A" for i in range(FORWARDED)]
            )
            started = time.monotonic()
            out = dig_batch(agent.dns_port, mix, tmp_path / "batch")
            took = time.monotonic() - started
            assert out.count("status: NOERROR") == 3 * EACH + FORWARDED, out[-2000:]
            assert out.count("status: NXDOMAIN") == EACH
            expected = {
                (("rcode", "NOERROR"), ("scope", "node"), ("type", "A")): EACH + FORWARDED,
                (("rcode", "NOERROR"), ("scope", "node"), ("type", "AAAA")): EACH,
                (("rcode", "NOERROR"), ("scope", "node"), ("type", "SRV")): EACH,
                (("rcode", "NXDOMAIN"), ("scope", "node"), ("type", "A")): EACH,
            }
            total = sum(expected.values())

            def reply_cache(samples: dict, name: str) -> float:
                family_now = family(samples, f"meshplane_dns_cache_{name}_total")
                family_before = family(before, f"meshplane_dns_cache_{name}_total")
                key = (("cache", "reply"),)
                return family_now.get(key, 0.0) - family_before.get(key, 0.0)

            def all_reported() -> bool:
                # The workers report once a second, each its queries and its cache's hits
                # and misses in one message: wait for the batch in both, counted from
                # `before`, so that nothing counted earlier can stand in for a late report.
                now = scrape(agent)
                asked = sum(family(now, "meshplane_dns_queries_total").values())
                asked -= sum(family(before, "meshplane_dns_queries_total").values())
                looked_up = reply_cache(now, "hits") + reply_cache(now, "misses")
                return asked >= total and looked_up >= 4 * EACH + FORWARDED

            reported = wait_for(all_reported, 20)
            samples = scrape(agent)
            assert reported, {
                name: family(samples, name)
                for name in (
                    "meshplane_dns_queries_total",
                    "meshplane_dns_cache_hits_total",
                    "meshplane_dns_cache_misses_total",
                )
            }
            counted = family(samples, "meshplane_dns_queries_total")
            print(f"dig sent {len(mix)} queries in {took:.2f}s; /metrics counts {counted}")
            assert set(counted) == set(expected), counted
            for labels, want in expected.items():
                assert abs(counted[labels] - want) <= 0.01 * want, (labels, counted[labels])
            forwards = family(samples, "meshplane_dns_forwards_total")
            assert forwards == {(("outcome", "answered"), ("upstream", address)): FORWARDED}
            assert upstream.count() == FORWARDED
            hits, misses = reply_cache(samples, "hits"), reply_cache(samples, "misses")
            # every mesh query was a hit or a miss; at most one miss per name and process
            print(f"reply cache: {hits:.0f} hits, {misses:.0f} misses")
            assert hits + misses >= 4 * EACH + FORWARDED
            assert misses <= 3 * (4 + FORWARDED)
            latency = family(samples, "meshplane_dns_answer_duration_seconds_count")[()]
            assert abs(latency - total) <= 0.01 * total, latency
            inf = family(samples, "meshplane_dns_answer_duration_seconds_bucket")[(("le", "+Inf"),)]
            assert inf == latency
            # all three processes answered: the sum is across them, the agent alone has less
            status, own = agent.request("GET", "/v1/dns")
            assert status == 200
            own_answers = own["stats"]["responder_answered"] + own["stats"]["responder_cache_hits"]
            print(f"the agent's own listener answered {own_answers}")
            assert 0 < own_answers < 4 * EACH
            # a worker killed and restarted takes back none of what it counted
            pid = int(
                re.findall(r"event=worker_started pool=dns index=0 pid=(\d+)", agent.log())[0]
            )
            os.kill(pid, signal.SIGKILL)
            assert wait_for(lambda: agent.log().count("dns_worker_ready") == 3, 20), agent.log()
            for _ in range(5):
                now = family(scrape(agent), "meshplane_dns_queries_total")
                assert all(now[labels] >= counted[labels] for labels in counted), now
                time.sleep(0.3)
        finally:
            agent.stop()
