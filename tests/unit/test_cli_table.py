"""Table layout and the cells the list commands show."""

from __future__ import annotations

from mesh.cli import members, network, service, task
from mesh.cli.table import fit, render, short_id


def test_columns_align_and_lines_end_without_blanks() -> None:
    text = render(["ID", "NAME", "PORTS"], [["abc", "web", "*:8080->80/tcp"], ["d", "", ""]])
    assert text.splitlines() == [
        "ID    NAME   PORTS",
        "abc   web    *:8080->80/tcp",
        "d",
    ]


def test_an_empty_list_is_the_header_alone() -> None:
    assert render(["ID", "NAME"], []) == "ID   NAME"


def test_a_width_cuts_the_widest_column_with_an_ellipsis() -> None:
    rows = [["a", "x" * 30, "short"]]
    text = render(["ID", "NAME", "MODE"], rows, width=30)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 30
    assert lines[1] == "a    " + "x" * 16 + "…   short"
    assert len(lines[1]) == 30


def test_without_a_width_nothing_is_cut() -> None:
    assert "x" * 300 in render(["NAME"], [["x" * 300]])


def test_fit_stops_at_the_headers_and_a_floor() -> None:
    assert fit([10, 40], [2, 11], 20) == [6, 11]
    assert fit([3, 4], [2, 4], 100) == [3, 4]


def test_short_id() -> None:
    assert short_id("0123456789abcdefghijklmno") == "0123456789ab"
    assert short_id("abc") == "abc"


def test_service_row() -> None:
    svc = {
        "id": "0123456789abcdefghijklmno",
        "name": "web",
        "endpoint_mode": "vip",
        "networks": ["front", "back"],
        "vips": [
            {"network": "front", "address": "10.0.1.2"},
            {"network": "ingress", "address": "10.255.0.5"},
        ],
        "ports": [
            {
                "protocol": "tcp",
                "target_port": 80,
                "published_port": 8080,
                "publish_mode": "ingress",
            },
            {"protocol": "udp", "target_port": 53, "published_port": 30001, "publish_mode": "host"},
        ],
    }
    counts = service.task_counts(
        [
            {"service": "web", "state": "running", "health": "healthy"},
            {"service": "web", "state": "running", "health": "starting"},
            {"service": "web", "state": "draining", "health": "healthy"},
            {"service": "db", "state": "running", "health": "unhealthy"},
        ]
    )
    assert counts == {"web": (1, 2), "db": (0, 1)}
    assert service.row(svc, counts) == [
        "0123456789ab",
        "web",
        "vip",
        "front,back",
        "10.0.1.2,10.255.0.5",
        "*:8080->80/tcp,30001->53/udp",
        "1/2",
    ]


def test_a_service_without_tasks_or_fields() -> None:
    assert service.row({"name": "x"}, {}) == ["", "x", "", "", "", "", "0/0"]


def test_task_row() -> None:
    row = task.row(
        {
            "id": "t" * 25,
            "name": "web.1.tttt",
            "service": "web",
            "node": "n1",
            "node_status": "dead",
            "address": "192.0.2.7",
            "ports": {"80": 31001, "443": 31443},
            "state": "running",
            "health": "healthy",
        }
    )
    assert row == [
        "t" * 12,
        "web.1.tttt",
        "web",
        "n1",
        "dead",
        "192.0.2.7",
        "80->31001,443->31443",
        "running",
        "healthy",
    ]
    assert len(row) == len(task.HEADERS) and task.HEADERS[4] == "NODE STATUS"


def test_network_row() -> None:
    assert network.row(
        {
            "id": "n" * 25,
            "name": "front",
            "driver": "overlay",
            "subnet": "10.0.1.0/24",
            "gateway": "10.0.1.1",
        }
    ) == ["n" * 12, "front", "overlay", "swarm", "10.0.1.0/24", "10.0.1.1", "no"]


def test_member_row() -> None:
    assert members.row(
        {"name": "n1", "address": "192.0.2.1", "port": 7946, "status": "alive", "incarnation": 3}
    ) == ["n1", "192.0.2.1:7946", "alive", "3"]
    assert members.row({"name": "n2", "address": "2001:db8::1", "port": 7946})[1] == (
        "[2001:db8::1]:7946"
    )
