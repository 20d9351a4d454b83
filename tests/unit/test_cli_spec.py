"""The flag grammars of the mesh CLI: --publish, --health-check, durations, labels, --port."""

from __future__ import annotations

from typing import Any

import pytest

from mesh.cli.errors import SpecError
from mesh.cli.spec import (
    parse_duration,
    parse_health_check,
    parse_labels,
    parse_port_map,
    parse_publish,
    parse_published_ref,
)


@pytest.mark.parametrize(
    ("text", "port"),
    [
        ("8080:80", {"target_port": 80, "published_port": 8080, "protocol": "tcp"}),
        ("8080:80/tcp", {"target_port": 80, "published_port": 8080, "protocol": "tcp"}),
        ("5353:53/udp", {"target_port": 53, "published_port": 5353, "protocol": "udp"}),
        ("80", {"target_port": 80, "protocol": "tcp"}),
        ("53/udp", {"target_port": 53, "protocol": "udp"}),
        (
            "published=8080,target=80",
            {"target_port": 80, "published_port": 8080, "protocol": "tcp"},
        ),
        (
            "published=8080,target=80,protocol=tcp,mode=host",
            {"target_port": 80, "published_port": 8080, "protocol": "tcp", "publish_mode": "host"},
        ),
        (
            "target=53,protocol=udp,mode=ingress",
            {"target_port": 53, "protocol": "udp", "publish_mode": "ingress"},
        ),
        ("mode=host, target=80", {"target_port": 80, "protocol": "tcp", "publish_mode": "host"}),
        ("65535:1", {"target_port": 1, "published_port": 65535, "protocol": "tcp"}),
        (
            "8080:80,traffic-policy=local",
            {
                "target_port": 80,
                "published_port": 8080,
                "protocol": "tcp",
                "traffic_policy": "local",
            },
        ),
        (
            "5353:53/udp,mode=host,traffic-policy=cluster",
            {
                "target_port": 53,
                "published_port": 5353,
                "protocol": "udp",
                "publish_mode": "host",
                "traffic_policy": "cluster",
            },
        ),
        (
            "published=8080,target=80,traffic-policy=local",
            {
                "target_port": 80,
                "published_port": 8080,
                "protocol": "tcp",
                "traffic_policy": "local",
            },
        ),
    ],
)
def test_publish(text: str, port: dict[str, Any]) -> None:
    assert parse_publish(text) == port


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "expected PUB:TARGET"),
        ("8080:", "expected PUB:TARGET"),
        (":80", "expected PUB:TARGET"),
        ("a:80", "expected PUB:TARGET"),
        ("8080-8081:80-81", "expected PUB:TARGET"),
        ("1.2.3.4:8080:80", "expected PUB:TARGET"),
        ("8080:80/sctp", "protocol 'sctp' is not one of tcp, udp"),
        ("8080:0", "target port 0 is out of range 1-65535"),
        ("70000:80", "published port 70000 is out of range 1-65535"),
        ("published=8080", "target= is required"),
        ("published=8080,target=80,mode=global", "mode 'global' is not one of ingress, host"),
        ("target=80,target=81", "target is given twice"),
        ("target=80,src=1", "unknown key 'src'"),
        ("target=80,host", "'host' is not KEY=VALUE"),
        ("target=x", "target port 'x' is not a number"),
        ("8080:80,traffic-policy=nearest", "traffic-policy 'nearest' is not one of cluster, local"),
        ("8080:80,protocol=udp", "unknown key 'protocol' (expected one of mode, traffic-policy)"),
        ("8080:80,local", "'local' is not KEY=VALUE"),
    ],
)
def test_publish_refuses(text: str, reason: str) -> None:
    with pytest.raises(SpecError, match=r"^invalid --publish") as caught:
        parse_publish(text)
    assert reason in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        ("8080", (8080, "tcp")),
        ("8080/tcp", (8080, "tcp")),
        ("53/udp", (53, "udp")),
    ],
)
def test_published_ref(text: str, ref: tuple[int, str]) -> None:
    assert parse_published_ref(text) == ref


@pytest.mark.parametrize("text", ["", "x", "8080:80", "8080/sctp", "0"])
def test_published_ref_refuses(text: str) -> None:
    with pytest.raises(SpecError, match=r"^invalid --publish-rm"):
        parse_published_ref(text)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("5", 5),
        ("2.5", 2.5),
        (".5", 0.5),
        ("500ms", 0.5),
        ("100ms", 0.1),
        ("5s", 5),
        ("1m", 60),
        ("1m30s", 90),
        ("1h", 3600),
        ("1.5s", 1.5),
        ("0", 0),
        ("0s", 0),
        ("1s500ms", 1.5),
    ],
)
def test_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_duration_keeps_whole_seconds_integral() -> None:
    assert isinstance(parse_duration("5s"), int)
    assert isinstance(parse_duration("300ms"), float)


@pytest.mark.parametrize("text", ["", "s", "5x", "-1", "5 s", "1d", "ms5", "5s5", "1e3"])
def test_duration_refuses(text: str) -> None:
    with pytest.raises(SpecError, match="not a duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "check"),
    [
        ("http", {"type": "http"}),
        ("http:/healthz", {"type": "http", "path": "/healthz"}),
        ("http:/a:b?x=1", {"type": "http", "path": "/a:b?x=1"}),
        ("tcp", {"type": "tcp"}),
        ("tcp:80", {"type": "tcp", "port": 80}),
        ("ttl", {"type": "ttl"}),
        ("ttl:30s", {"type": "ttl", "ttl": 30}),
        ("ttl,ttl=1m,start_period=10s", {"type": "ttl", "ttl": 60, "start_period": 10}),
        (
            "http:/healthz,port=8080,interval=10s,timeout=500ms,retries=5,start_period=1m",
            {
                "type": "http",
                "path": "/healthz",
                "port": 8080,
                "interval": 10,
                "timeout": 0.5,
                "retries": 5,
                "start_period": 60,
            },
        ),
        (
            "http,path=/ready,status=200-299",
            {"type": "http", "path": "/ready", "status_min": 200, "status_max": 299},
        ),
        ("http,status=204", {"type": "http", "status_min": 204, "status_max": 204}),
        ("tcp:5432, interval=2", {"type": "tcp", "port": 5432, "interval": 2}),
    ],
)
def test_health_check(text: str, check: dict[str, Any]) -> None:
    assert parse_health_check(text) == check


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "kind '' is not one of http, tcp, ttl"),
        ("grpc:80", "kind 'grpc' is not one of http, tcp, ttl"),
        ("HTTP", "kind 'HTTP' is not one of"),
        ("http:healthz", "path 'healthz' does not start with /"),
        ("http:", "path '' does not start with /"),
        ("http:/a,path=/b", "path is given twice"),
        ("tcp:80,port=81", "port is given twice"),
        ("tcp:http", "port 'http' is not a number"),
        ("tcp:0", "port 0 is out of range"),
        ("tcp,path=/x", "path does not apply to a tcp check"),
        ("tcp,status=200", "status does not apply to a tcp check"),
        ("ttl,interval=5s", "interval does not apply to a ttl check"),
        ("http,ttl=5s", "ttl does not apply to an http check"),
        ("http,interval", "'interval' is not KEY=VALUE"),
        ("http,color=red", "unknown key 'color'"),
        ("http,interval=5x", "interval '5x' is not a duration"),
        ("http,interval=0", "interval must be more than 0"),
        ("ttl:0s", "ttl must be more than 0"),
        ("http,timeout=-1s", "timeout '-1s' is not a duration"),
        ("http,retries=0", "retries 0 is out of range"),
        ("http,retries=many", "retries 'many' is not a number"),
        ("http,status=299-200", "status range '299-200' is empty"),
        ("http,status=200-", "status '' is not a number"),
        ("http,status=99", "status 99 is out of range 100-599"),
    ],
)
def test_health_check_refuses(text: str, reason: str) -> None:
    with pytest.raises(SpecError, match=r"^invalid --health-check") as caught:
        parse_health_check(text)
    assert reason in str(caught.value)
    assert "\n" not in str(caught.value)


def test_labels() -> None:
    assert parse_labels(["a=1", "b=x=y", "c", "a=2", "d="]) == {
        "a": "2",
        "b": "x=y",
        "c": "",
        "d": "",
    }


@pytest.mark.parametrize("item", ["=1", "", " =x"])
def test_labels_refuse_an_empty_key(item: str) -> None:
    with pytest.raises(SpecError, match="the key is empty"):
        parse_labels([item])


def test_port_map() -> None:
    assert parse_port_map(["80=31001", "443=31443"]) == {"80": 31001, "443": 31443}
    assert parse_port_map([]) == {}


@pytest.mark.parametrize(
    ("items", "reason"),
    [
        (["80"], "expected TARGET=ACTUAL"),
        (["80=x"], "actual port 'x' is not a number"),
        (["0=80"], "target port 0 is out of range"),
        (["80=1", "80=2"], "target port 80 is mapped twice"),
    ],
)
def test_port_map_refuses(items: list[str], reason: str) -> None:
    with pytest.raises(SpecError, match=r"^invalid --port") as caught:
        parse_port_map(items)
    assert reason in str(caught.value)
