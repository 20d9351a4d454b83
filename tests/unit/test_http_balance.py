"""Round robin, sticky cookies and passive health, on a fake clock."""

from __future__ import annotations

from lb.http.balance import Balancer
from lb.http.routes import Endpoint, Match, Route


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def match(count: int, sticky: str | None = None) -> Match:
    route = Route(
        service="web",
        host="a.example",
        path_prefix="/",
        target_port=80,
        sticky_cookie=sticky,
        redirect=None,
        passthrough=False,
    )
    return Match(route, tuple(Endpoint(f"t{i}", "127.0.0.1", 9000 + i) for i in range(count)))


def test_round_robin_visits_every_endpoint_in_turn() -> None:
    balancer = Balancer(Clock())
    m = match(3)
    picks = [balancer.pick(m) for _ in range(6)]
    assert [p.task_id for p in picks if p] == ["t1", "t2", "t0", "t1", "t2", "t0"]


def test_round_robin_is_per_route() -> None:
    balancer = Balancer(Clock())
    a, b = match(2), match(2, sticky="S")
    assert [
        balancer.pick(a).task_id,
        balancer.pick(b).task_id,  # type: ignore[union-attr]
        balancer.pick(a).task_id,
    ] == ["t1", "t1", "t0"]  # type: ignore[union-attr]


def test_sticky_value_naming_a_live_task_wins() -> None:
    balancer = Balancer(Clock())
    m = match(3, sticky="S")
    assert {balancer.pick(m, "t2").task_id for _ in range(5)} == {"t2"}  # type: ignore[union-attr]
    assert balancer.pick(m, "gone") is not None  # an unknown task: round robin


def test_a_refusing_task_is_ejected_for_a_while() -> None:
    clock = Clock()
    balancer = Balancer(clock, eject_seconds=10)
    m = match(2, sticky="S")
    balancer.connect_failed("t0")
    assert balancer.ejected() == ["t0"] and balancer.ejections == 1
    assert {balancer.pick(m).task_id for _ in range(4)} == {"t1"}  # type: ignore[union-attr]
    assert balancer.pick(m, "t0").task_id == "t1"  # type: ignore[union-attr]
    clock.now += 10
    assert balancer.ejected() == []
    assert {balancer.pick(m).task_id for _ in range(4)} == {"t0", "t1"}  # type: ignore[union-attr]


def test_with_every_task_ejected_one_is_tried_anyway() -> None:
    balancer = Balancer(Clock())
    m = match(2)
    balancer.connect_failed("t0")
    balancer.connect_failed("t1")
    assert balancer.pick(m) is not None


def test_exclude_gives_the_retry_another_task() -> None:
    balancer = Balancer(Clock())
    m = match(2)
    assert balancer.pick(m, exclude=["t0"]).task_id == "t1"  # type: ignore[union-attr]
    assert balancer.pick(m, exclude=["t0", "t1"]) is None


def test_route_stats_count_by_status_class() -> None:
    balancer = Balancer(Clock())
    stats = balancer.stats(match(1).route)
    stats.record(200, 0.5)
    stats.record(503, 0.25)
    assert stats.requests == {"1xx": 0, "2xx": 1, "3xx": 0, "4xx": 0, "5xx": 1}
    assert stats.latency_sum == 0.75 and stats.latency_count == 2
    # one in the (0.1, 0.25] bucket, one in (0.25, 0.5]: a bound is in its own bucket
    assert stats.latency_buckets == [0] * 5 + [1, 1] + [0] * 5
    assert balancer.stats(match(1).route) is stats  # an equal route shares its counters


def test_worker_snapshots_add_up() -> None:
    from lb.http.serving import merge_snapshots

    route = {
        "service": "web",
        "host": "a",
        "path_prefix": "/",
        "latency_sum": 1.0,
        "latency_count": 2,
        "retries": 1,
    }
    one = {
        "requests": 2,
        "rejected": {"400": 1},
        "ejected": ["t1"],
        "routes": [{**route, "requests": {"2xx": 2}}],
    }
    two = {
        "requests": 3,
        "rejected": {"400": 2, "408": 1},
        "ejected": ["t2"],
        "routes": [{**route, "requests": {"2xx": 1, "5xx": 2}}],
    }
    total = merge_snapshots([one, two])
    assert total["workers"] == 2 and total["requests"] == 5
    assert total["rejected"] == {"400": 3, "408": 1} and total["ejected"] == ["t1", "t2"]
    [merged] = total["routes"]
    assert merged["requests"] == {"2xx": 3, "5xx": 2}
    assert merged["latency_count"] == 4 and merged["retries"] == 2


def test_a_restarted_worker_never_takes_the_sum_backwards() -> None:
    from lb.http.service import HttpEndpoints
    from lb.http.serving import HttpMesh
    from lb.http.settings import RouterSettings

    mesh = HttpMesh(HttpEndpoints(host="127.0.0.1", port=0), RouterSettings(), 2, "info")
    route = {"service": "web", "host": "a", "path_prefix": "/", "latency_sum": 0.5}
    route |= {"latency_count": 5, "retries": 0}

    def report(pid: int, requests: int, open_: int) -> dict[str, object]:
        stats = {"requests": requests, "connections_open": open_, "rejected": {"400": 1}}
        stats["tls_outcomes"] = {"certificate": requests, "failed": 1}
        routes = [{**route, "requests": {"2xx": requests}}]
        return {"http_worker": pid, "stats": {**stats, "routes": routes}}

    mesh.on_report(report(1, 5, 2))
    mesh.on_report(report(2, 7, 1))
    assert mesh.snapshot()["requests"] == 12
    mesh.on_gone(report(1, 5, 2))  # worker 1 died; its replacement starts from zero
    mesh.on_report(report(3, 0, 0))
    total = mesh.snapshot()
    assert total["requests"] == 12 and total["routes"][0]["requests"] == {"2xx": 12}
    assert total["rejected"] == {"400": 3}
    assert total["tls_outcomes"] == {"certificate": 12, "failed": 3}  # by outcome, kept too
    assert total["connections_open"] == 1  # a gauge: the dead worker's connections are gone
    assert total["workers"] == 2
    mesh.on_report(report(3, 4, 1))
    assert mesh.snapshot()["requests"] == 16
    mesh.on_gone({"http_worker": 99})  # never reported: nothing to fold
    assert mesh.snapshot()["requests"] == 16
