"""The CLI's network flags (issue 15): `network create`'s driver options, `--network
name=NET,alias=A` on `service create|update`, and the bodies they make."""

from __future__ import annotations

import pytest

from mesh.cli import network, service
from mesh.cli.errors import SpecError
from mesh.cli.main import build_parser
from mesh.cli.spec import parse_network, parse_networks
from mesh.cli.update import compute_patch


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("front", ("front", ())),
        ("name=front", ("front", ())),
        ("name=front,alias=www", ("front", ("www",))),
        ("alias=www,name=front,alias=web2", ("front", ("www", "web2"))),
        ("name=front,alias=www,alias=www", ("front", ("www",))),
    ],
)
def test_parse_network(text: str, parsed: tuple[str, tuple[str, ...]]) -> None:
    assert parse_network(text) == parsed


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "expected NET"),
        ("a,b", "expected NET"),
        ("alias=www", "name=NET is missing"),
        ("name=a,name=b", "name is given twice"),
        ("name=a,ip=10.0.0.1", "unknown key 'ip'"),
        ("name=a,alias=", "is not KEY=VALUE"),
    ],
)
def test_parse_network_refuses(text: str, why: str) -> None:
    with pytest.raises(SpecError, match=why):
        parse_network(text)


def test_parse_networks_collects_aliases_and_refuses_a_network_twice() -> None:
    assert parse_networks(["a", "name=b,alias=x"]) == (["a", "b"], {"b": ["x"]})
    with pytest.raises(SpecError, match="given twice"):
        parse_networks(["a", "name=a,alias=x"])


def test_network_create_body_has_every_flag() -> None:
    args = build_parser().parse_args(
        [
            "network",
            "create",
            "front",
            "--driver",
            "bridge",
            "--subnet",
            "10.9.0.0/24",
            "--gateway",
            "10.9.0.254",
            "--ip-range",
            "10.9.0.128/25",
            "--aux-address",
            "router=10.9.0.200",
            "--aux-address",
            "dns=10.9.0.201",
            "--internal",
            "--attachable=false",
            "--opt",
            "icc=false",
        ]
    )
    assert network.create_body(args) == {
        "name": "front",
        "driver": "bridge",
        "subnet": "10.9.0.0/24",
        "gateway": "10.9.0.254",
        "ip_range": "10.9.0.128/25",
        "aux_addresses": {"router": "10.9.0.200", "dns": "10.9.0.201"},
        "internal": True,
        "attachable": False,
        "options": {"icc": "false"},
    }
    bare = build_parser().parse_args(["network", "create", "n", "--attachable"])
    assert network.create_body(bare) == {"name": "n", "attachable": True}
    with pytest.raises(SpecError, match="expected KEY=VALUE"):
        network.create_body(build_parser().parse_args(["network", "create", "n", "--opt", "x"]))


def test_network_create_takes_a_bare_opt_encrypted_as_docker_does() -> None:
    args = build_parser().parse_args(
        ["network", "create", "sec", "--driver", "overlay", "--opt", "encrypted"]
    )
    assert network.create_body(args)["options"] == {"encrypted": "true"}
    args = build_parser().parse_args(["network", "create", "s", "--opt", "encrypted=false"])
    assert network.create_body(args)["options"] == {"encrypted": "false"}


def test_network_ls_row_shows_driver_scope_and_internal() -> None:
    row = network.row(
        {"id": "0123456789abcdef", "name": "a", "driver": "bridge", "scope": "local",
         "subnet": "10.9.0.0/24", "gateway": "10.9.0.1", "internal": True}
    )  # fmt: skip
    assert row == ["0123456789ab", "a", "bridge", "local", "10.9.0.0/24", "10.9.0.1", "yes"]


def test_service_create_sends_networks_and_aliases() -> None:
    args = build_parser().parse_args(
        ["service", "create", "web", "--network", "back", "--network", "name=front,alias=www"]
    )
    body = service.create_body(args)
    assert body["networks"] == ["back", "front"]
    assert body["aliases"] == {"front": ["www"]}


def test_service_update_network_long_form_adds_aliases_and_keeps_the_others() -> None:
    args = build_parser().parse_args(
        ["service", "update", "web", "--network", "name=b,alias=bee", "--network-rm", "c"]
    )
    current = {
        "name": "web",
        "networks": ["a", "c"],
        "aliases": {"a": ["ay"], "c": ["see"]},
    }
    patch = compute_patch(current, service.changes_of(args))
    assert patch == {"networks": ["a", "b"], "aliases": {"a": ["ay"], "b": ["bee"]}}
