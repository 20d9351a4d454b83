"""Gossip simulator benchmark: the membership core at 100 and 1,000 nodes, in virtual time.

Three scenarios, each on the LAN profile (memberlist DefaultLANConfig; links
2 ms +- 1 ms) with one fixed seed, all driving the real `gossip.membership`
core through `gossip.sim` (deterministic: same seed, same table):

1. dissemination: 1,000 nodes converge, then 5 user broadcasts (each from a
   random node) at 0% and at 20% packet loss; the time until 99.9% of live
   nodes hold it (p50 and max over the broadcasts). Targets: <= 2.5 s at 0%,
   <= 5 s at 20% (max over broadcasts).
2. detection: 100 nodes, 1% loss, 30 crashes one at a time (each restarted
   and re-converged before the next); crash -> last node marking it failed,
   p50 <= 10 s and p99 <= 12 s (kinship's memberlist figures: 10.02 s /
   12.11 s max); no (crash, observer) pair undetected.
3. false positives: 100 nodes, 10 minutes at 10% loss with 5% slow nodes
   (receive path 0.5-2.5 s late), three arms: Lifeguard off (plain SWIM),
   Lifeguard as memberlist has it, and as the agent runs it (plus our
   lateness extension, gossip/lateness.py): no false death with Lifeguard;
   false suspicions at least 10x fewer than with it off (the agent's arm is
   the one checked; memberlist's ratio is printed beside it).

Prints one table; exits 1 and names the targets missed, if any.

    .venv/bin/python benchmarks/gossip_sim.py [--seed 1] [--quick] [--only detection]

`--quick` runs small versions (100-node dissemination, 20-node detection,
30 nodes for 60 s) for a CI smoke test; there only the correctness targets
(convergence, nothing undetected, no false death with Lifeguard) are checked.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gossip.config import GossipConfig
from gossip.sim import scenarios
from gossip.sim.metrics import percentile

SCENARIOS = ("dissemination", "detection", "false")


@dataclass(frozen=True, slots=True)
class Size:
    spread_nodes: int
    broadcasts: int
    detect_nodes: int
    crashes: int
    false_nodes: int
    false_seconds: float


FULL = Size(
    spread_nodes=1000,
    broadcasts=5,
    detect_nodes=100,
    crashes=30,
    false_nodes=100,
    false_seconds=600.0,
)
QUICK = Size(
    spread_nodes=100, broadcasts=2, detect_nodes=20, crashes=3, false_nodes=30, false_seconds=60.0
)


@dataclass(frozen=True, slots=True)
class Row:
    scenario: str
    metric: str
    value: str
    target: str = ""
    ok: bool | None = None  # None: no target, informational
    smoke: bool = False  # checked in --quick mode as well


def _s(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.2f} s"


def _known(values: Sequence[float | None]) -> list[float]:
    return [v for v in values if v is not None]


Task = tuple[str, str]  # (scenario, arm) - one unit of work for a worker process
ARMS = {
    "off": "Lifeguard off",
    "memberlist": "Lifeguard as memberlist",
    "on": "Lifeguard + lateness (the agent)",
}


def plan(only: Sequence[str]) -> list[Task]:
    """The runs, longest first (so two workers finish together)."""
    tasks: list[Task] = []
    if "dissemination" in only:
        tasks.append(("dissemination", "on"))
    if "false" in only:
        tasks += [("false", "off"), ("false", "memberlist"), ("false", "on")]
    if "detection" in only:
        tasks.append(("detection", "on"))
    return tasks


def execute(task: Task, size: Size, seed: int, wire: str) -> object:
    """Run one task (in a worker process): a scenario result, picklable."""
    name, arm = task
    if name == "dissemination":
        return scenarios.dissemination(
            size.spread_nodes,
            list(SPREAD_TARGETS),
            seed=seed,
            broadcasts=size.broadcasts,
            wire=_wire(wire, size.spread_nodes),
        )
    if name == "detection":
        return scenarios.detection(
            size.detect_nodes,
            size.crashes,
            loss=0.01,
            seed=seed,
            wire=_wire(wire, size.detect_nodes),
        )
    config = GossipConfig.lan()
    if arm == "memberlist":
        config = dataclasses.replace(config, lateness=False)
    return scenarios.false_positives(
        size.false_nodes,
        loss=0.10,
        slow_fraction=0.05,
        seconds=size.false_seconds,
        lifeguard=arm != "off",
        seed=seed,
        wire=_wire(wire, size.false_nodes),
        config=config,
    )


AUTO_OBJECTS_ABOVE = 200  # nodes: past this, --wire auto skips the codec (see README)


def _wire(mode: str, nodes: int) -> bool:
    """True: packets go through gossip.codec as bytes."""
    return mode == "bytes" or (mode == "auto" and nodes <= AUTO_OBJECTS_ABOVE)


SPREAD_TARGETS = {0.0: 2.5, 0.2: 5.0}


def dissemination_rows(results: Sequence[scenarios.DisseminationResult]) -> list[Row]:
    rows = []
    for result in results:
        name = f"dissemination {result.nodes} n, {result.loss:.0%} loss"
        t999 = result.times(0.999)
        reached = _known(t999)
        worst = max(reached) if len(reached) == len(t999) else None
        target = SPREAD_TARGETS[result.loss]
        rows.append(
            Row(
                name,
                f"99.9% p50 ({len(t999)} broadcasts)",
                _s(percentile(reached, 50) if reached else None),
            )
        )
        rows.append(
            Row(
                name,
                "99.9% max",
                _s(worst),
                f"<= {target:g} s",
                worst is not None and worst <= target,
            )
        )
        for q, label in ((0.5, "50%"), (0.99, "99%"), (1.0, "100%")):
            known = _known(result.times(q))
            rows.append(
                Row(
                    name,
                    f"{label} p50 / max",
                    f"{_s(percentile(known, 50) if known else None)} / "
                    f"{_s(max(known) if len(known) == len(t999) else None)}",
                )
            )
        rows.append(
            Row(name, "bytes/node/s (join backlog incl.)", f"{result.bytes_per_node_s:,.0f}")
        )
    rows.append(
        Row(
            f"dissemination {results[0].nodes} n",
            "all joined and converged after",
            _s(results[0].converge_s),
            "converges",
            True,
            smoke=True,
        )
    )
    return rows


def detection_rows(result: scenarios.DetectionResult) -> list[Row]:
    s = result.summary
    name = f"detection {result.nodes} n, {result.loss:.0%} loss, {s.crashes} crashes"
    return [
        Row(name, "crash -> last node p50", _s(s.last_p50), "<= 10 s", s.last_p50 <= 10.0),
        Row(name, "crash -> last node p99", _s(s.last_p99), "<= 12 s", s.last_p99 <= 12.0),
        Row(name, "crash -> last node max", _s(s.last_max)),
        Row(
            name,
            f"per observer p50 / p99 / max ({s.pairs} pairs)",
            f"{_s(s.p50)} / {_s(s.p99)} / {_s(s.max)}",
        ),
        Row(name, "crash -> first probe of it p50 / max", f"{_s(s.probe_p50)} / {_s(s.probe_max)}"),
        Row(
            name, "crash -> first suspicion p50 / max", f"{_s(s.suspect_p50)} / {_s(s.suspect_max)}"
        ),
        Row(
            name,
            "first suspicion -> first verdict p50 / max",
            f"{_s(s.verdict_p50)} / {_s(s.verdict_max)}",
        ),
        Row(
            name, "first verdict -> last node p50 / max", f"{_s(s.spread_p50)} / {_s(s.spread_max)}"
        ),
        Row(
            name,
            "undetected pairs / missed crashes",
            f"{s.undetected} / {s.missed}",
            "0 / 0",
            s.undetected == 0 and s.missed == 0,
            smoke=True,
        ),
        Row(
            name,
            "false deaths",
            str(result.false_deaths),
            "0",
            result.false_deaths == 0,
            smoke=True,
        ),
        Row(
            name,
            "restarts not re-converged in 120 s",
            str(result.rejoin_failures),
            "0",
            result.rejoin_failures == 0,
            smoke=True,
        ),
        Row(name, "bytes/node/s", f"{result.bytes_per_node_s:,.0f}"),
    ]


def false_rows(arms: dict[str, scenarios.FalsePositiveResult]) -> list[Row]:
    """The three arms' counts, then the ratio the target is about: off / the agent's."""
    on, off = arms["on"], arms["off"]
    base = (
        f"false positives {on.nodes} n, {on.loss:.0%} loss, {len(on.slow)} slow, "
        f"{on.seconds / 60:g} min"
    )
    rows = []
    for label, arm in arms.items():
        name = f"{base}, {ARMS[label]}"
        checked = label == "on"  # the agent's arm; memberlist's is shown for comparison
        rows.append(
            Row(
                name,
                "false deaths (of slow nodes)",
                f"{arm.false_deaths} ({arm.deaths_of_slow})",
                "0" if checked else "",
                arm.false_deaths == 0 if checked else None,
                smoke=checked,
            )
        )
        rows.append(
            Row(
                name,
                "false suspicions (of slow / by slow / healthy only)",
                f"{arm.false_suspicions} ({arm.of_slow} / {arm.by_slow} / {arm.among_healthy})",
            )
        )
        rows.append(Row(name, "bytes/node/s", f"{arm.bytes_per_node_s:,.0f}"))
    rows.append(
        Row(
            base,
            "false suspicions off / on (the agent)",
            _ratio(off.false_suspicions, on.false_suspicions),
            ">= 10x",
            _times(off.false_suspicions, on.false_suspicions) >= 10,
        )
    )
    if "memberlist" in arms:
        rows.append(
            Row(
                base,
                "false suspicions off / Lifeguard as memberlist",
                _ratio(off.false_suspicions, arms["memberlist"].false_suspicions),
            )
        )
    return rows


def _times(over: int, under: int) -> float:
    return over / under if under else math.inf


def _ratio(over: int, under: int) -> str:
    return f"{_times(over, under):.1f}x" if under else f"{over} / 0"


def rows_of(results: dict[Task, object]) -> list[Row]:
    rows: list[Row] = []
    for task in sorted(results, key=lambda t: SCENARIOS.index(t[0])):
        result = results[task]
        if isinstance(result, Exception):
            rows.append(
                Row(
                    task[0],
                    "error",
                    f"{type(result).__name__}: {result}",
                    "runs",
                    False,
                    smoke=True,
                )
            )
        elif task[0] == "dissemination":
            rows += dissemination_rows(cast(list[scenarios.DisseminationResult], result))
        elif task[0] == "detection":
            rows += detection_rows(cast(scenarios.DetectionResult, result))
        elif task[1] == "on":  # the agent's arm; the others come along
            arms = {arm: results[("false", arm)] for arm in ARMS if ("false", arm) in results}
            if not any(isinstance(r, Exception) for r in arms.values()):
                rows += false_rows(
                    {arm: cast(scenarios.FalsePositiveResult, r) for arm, r in arms.items()}
                )
    return rows


def render(rows: Sequence[Row], quick: bool) -> str:
    """One table: a line per scenario, then its metrics indented under it."""

    def verdict(row: Row) -> str:
        if row.ok is None or not row.target:
            return ""
        if quick and not row.smoke:
            return "(not checked)"
        return "ok" if row.ok else "MISSED"

    header = ("scenario / metric", "value", "target", "")
    body: list[tuple[str, str, str, str] | str] = []
    scenario = None
    for row in rows:
        if row.scenario != scenario:
            scenario = row.scenario
            body.append(scenario)
        body.append(("  " + row.metric, row.value, row.target, verdict(row)))
    cells = [header] + [line for line in body if isinstance(line, tuple)]
    widths = [max(len(line[i]) for line in cells) for i in range(4)]

    def fmt(line: tuple[str, str, str, str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()

    lines = [fmt(header), "-" * (sum(widths) + 6)]
    lines += [line if isinstance(line, str) else fmt(line) for line in body]
    return "\n".join(lines)


def run(
    tasks: Sequence[Task], size: Size, seed: int, wire: str, jobs: int
) -> tuple[dict[Task, object], list[str]]:
    """Run the tasks, in `jobs` worker processes if > 1; results do not depend on `jobs`."""
    results: dict[Task, object] = {}
    timings: list[str] = []

    def done(task: Task, result: object, seconds: float) -> None:
        results[task] = result
        label = task[0] if task[0] != "false" else f"false/{task[1]}"
        timings.append(f"{label} {seconds:.1f}s")

    if jobs <= 1:
        for task in tasks:
            done(task, *_timed(task, size, seed, wire))
        return results, timings
    with concurrent.futures.ProcessPoolExecutor(jobs) as pool:
        futures = {pool.submit(_timed, task, size, seed, wire): task for task in tasks}
        for future in concurrent.futures.as_completed(futures):
            result, seconds = future.result()
            done(futures[future], result, seconds)
    return results, timings


def _timed(task: Task, size: Size, seed: int, wire: str) -> tuple[object, float]:
    t0 = time.perf_counter()
    try:
        result = execute(task, size, seed, wire)
    except Exception as exc:  # reported as a missed target, with the others still shown
        result = exc
    return result, time.perf_counter() - t0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a CI smoke")
    parser.add_argument(
        "--only", choices=SCENARIOS, action="append", help="run only this scenario (repeatable)"
    )
    parser.add_argument(
        "--wire",
        choices=("auto", "bytes", "objects"),
        default="auto",
        help="bytes: every packet through gossip.codec; objects: message "
        "objects with exact encoded sizes; auto (default): objects "
        f"above {AUTO_OBJECTS_ABOVE} nodes (the 1,000-node dissemination)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="worker processes (default: 2, or 1 on one CPU)",
    )
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    started = time.perf_counter()
    results, timings = run(plan(args.only or SCENARIOS), size, args.seed, args.wire, args.jobs)
    rows = rows_of(results)
    mode = "quick" if args.quick else "full"
    print(
        f"Gossip simulator ({mode}): lan profile, links 2 ms +- 1 ms, seed {args.seed}, "
        f"wire {args.wire}; times are virtual"
    )
    print(render(rows, args.quick))
    print(
        f"- wall time: {', '.join(timings)}; total {time.perf_counter() - started:.1f}s "
        f"with {args.jobs} worker(s)"
    )
    missed = [r for r in rows if r.ok is False and (r.smoke or not args.quick)]
    for row in missed:
        print(f"MISSED: {row.scenario}: {row.metric} = {row.value} (target {row.target})")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
