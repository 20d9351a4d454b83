"""`mesh agent` configuration: flags over the TOML file over the environment over defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh import config
from mesh.config import ConfigError, HostPort, load_config, parse_host_port
from mesh.core.capabilities import Capabilities


@pytest.fixture(params=[True, False], ids=["root", "user"])
def root(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    monkeypatch.setattr(config, "runs_privileged", lambda: request.param)
    monkeypatch.setenv("HOME", "/home/someone")
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    return bool(request.param)


def test_embedded_defaults_follow_privilege(root: bool) -> None:
    cfg = load_config([], env={})
    assert cfg.api == HostPort("127.0.0.1", 2377)
    assert cfg.dns == HostPort("127.0.0.11", 53 if root else 5353)
    assert cfg.http == HostPort("0.0.0.0", 80 if root else 8080)
    assert cfg.address_pool == ("10.0.0.0/8" if root else "127.16.0.0/12")
    expected_dir = "/var/lib/meshplane" if root else "/home/someone/.local/state/meshplane"
    assert cfg.data_dir == Path(expected_dir)
    assert cfg.advertise.port == 7946


def test_flags_win_over_file_and_file_over_defaults(tmp_path: Path, root: bool) -> None:
    file = tmp_path / "agent.toml"
    file.write_text(
        'node-name = "from-file"\napi = "127.0.0.1:9000"\n'
        'drain_grace = 5\njoin = ["10.0.0.2", "10.0.0.3:8000"]\n'
    )
    cfg = load_config(["--config", str(file), "--api", "127.0.0.1:9001"], env={})
    assert cfg.node_name == "from-file"
    assert cfg.api.port == 9001
    assert cfg.drain_grace == 5.0
    assert cfg.join == (HostPort("10.0.0.2", 7946), HostPort("10.0.0.3", 8000))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("bogus = 1\n", "unknown key"),
        ("api = [1]\n", "must be a string"),
        ("join = 'x'\n", "list of strings"),
        ("api = \n", "not valid TOML"),
    ],
)
def test_bad_config_files_are_refused(
    tmp_path: Path, content: str, message: str, root: bool
) -> None:
    file = tmp_path / "agent.toml"
    file.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_config(["--config", str(file)], env={})


def test_public_api_requires_a_token(root: bool) -> None:
    with pytest.raises(ConfigError, match="api-token"):
        load_config(["--api", "0.0.0.0:2377"], env={})
    cfg = load_config(["--api", "0.0.0.0:2377"], env={"MESH_API_TOKEN": "s3cret-token"})
    assert cfg.api_token == "s3cret-token"
    assert "s3cret-token" not in repr(cfg)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lb", "magic"], "lb"),
        (["--address-pool", "10.0.0.0/25"], "/24 or larger"),
        (["--drain-grace", "soon"], "not a number"),
        (["--api", "127.0.0.1:99999"], "port"),
        (["--api", "127.0.0.1"], "ADDR:PORT"),
        (["--dns-upstream", "resolver.example"], "IP address"),
        (["--dns-ttl", "5.5"], "not a number"),
        (["--gossip-profile", "fast"], "gossip-profile"),
        (["--cluster-label", "x" * 256], "255 bytes"),
        (["--ingress-subnet", "10.0.0.1/16"], "ingress-subnet: .*host bits set"),
        (["--ingress-subnet", "fd00::/64"], "ingress-subnet: .*only IPv4"),
        (["--ingress-subnet", "10.0.0.0/30"], "ingress-subnet: .*too small"),
        (["--ingress-subnet", "ten"], "ingress-subnet: .*not an IPv4 CIDR"),
    ],
)
def test_bad_flags_are_refused(flags: list[str], message: str, root: bool) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(flags, env={})


def test_host_port_forms() -> None:
    assert parse_host_port("[::1]:53", None, "dns") == HostPort("::1", 53)
    assert parse_host_port("node-2", 7946, "join") == HostPort("node-2", 7946)
    assert str(HostPort("::1", 53)) == "[::1]:53"
    for bad in ("127.0.0.1:\u00b2", "127.0.0.1:\u0663", "127.0.0.1:0", "127.0.0.1:65536"):
        # "\u00b2" and "\u0663" pass str.isdigit() but int() refuses or misreads them
        with pytest.raises(ConfigError, match="the port must be a number"):
            parse_host_port(bad, None, "api")


def test_lb_tcp_idle_defaults_past_keepalive_and_is_bounded() -> None:
    assert load_config([], env={}).lb_tcp_idle == 7800.0
    assert load_config(["--lb-tcp-idle", "86400"], env={}).lb_tcp_idle == 86400.0
    for bad in ("0", "-5", "9e9", "soon"):
        with pytest.raises(ConfigError, match="lb-tcp-idle"):
            load_config(["--lb-tcp-idle", bad], env={})


def test_ingress_subnet_from_the_flag_or_the_file(tmp_path: Path, root: bool) -> None:
    assert load_config([], env={}).ingress_subnet is None  # a /16 of the pool, at start
    file = tmp_path / "agent.toml"
    file.write_text('ingress-subnet = "10.128.0.0/16"\n')
    assert load_config(["--config", str(file)], env={}).ingress_subnet == "10.128.0.0/16"
    flagged = load_config(["--config", str(file), "--ingress-subnet", "10.9.0.0/20"], env={})
    assert flagged.ingress_subnet == "10.9.0.0/20"


@pytest.mark.parametrize(
    ("euid", "mask", "privileged"),
    [
        (0, 0, True),
        # the hardened unit's service user: both capabilities, root's defaults
        (998, 1 << 10 | 1 << 12, True),
        (998, 1 << 10, False),
        (998, 1 << 12, False),
        (998, 0, False),
    ],
)
def test_a_service_user_with_the_capabilities_gets_the_root_defaults(
    monkeypatch: pytest.MonkeyPatch, euid: int, mask: int, privileged: bool
) -> None:
    monkeypatch.setattr(config.os, "geteuid", lambda: euid)
    monkeypatch.setattr(config, "effective", lambda: Capabilities(mask))
    assert config.runs_privileged() is privileged
