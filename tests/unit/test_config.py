"""`mesh agent` configuration: flags over the TOML file over the environment over defaults."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mesh import config
from mesh.api_tokens import Scope
from mesh.config import ConfigError, HostPort, describe, load_config, parse_host_port
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
        load_config(["--api", "0.0.0.0:2377", "--api-insecure"], env={})
    cfg = load_config(
        ["--api", "0.0.0.0:2377", "--api-insecure"], env={"MESH_API_TOKEN": "s3cret-token"}
    )
    assert cfg.api_token == "s3cret-token"
    assert cfg.api_tokens.scope_of(b"s3cret-token") is Scope.WRITE
    assert "s3cret-token" not in repr(cfg)
    assert "s3cret-token" not in str(describe(cfg))


def test_public_api_requires_tls_or_api_insecure(tmp_path: Path, root: bool) -> None:
    env = {"MESH_API_TOKEN": "s3cret-token"}
    with pytest.raises(ConfigError, match=r"plain HTTP.*--api-tls-cert.*--api-insecure"):
        load_config(["--api", "0.0.0.0:2377"], env=env)
    with pytest.raises(ConfigError, match="plain HTTP"):
        load_config(["--api", "[::]:2377"], env=env)
    # Loopback stays plain HTTP without a word, as before.
    assert not load_config(["--api", "127.0.0.1:2377"], env=env).api_tls
    cfg = load_config(
        ["--api", "0.0.0.0:2377", "--api-tls-cert", "c.pem", "--api-tls-key", "k.pem"], env=env
    )
    assert cfg.api_tls and cfg.api_tls_ca is None
    file = tmp_path / "agent.toml"
    file.write_text('api = "0.0.0.0:2377"\napi-insecure = true\n')
    assert load_config(["--config", str(file)], env=env).api_insecure
    file.write_text('api = "0.0.0.0:2377"\napi-insecure = false\n')
    with pytest.raises(ConfigError, match="plain HTTP"):
        load_config(["--config", str(file)], env=env)
    file.write_text('api-insecure = "yes"\n')
    with pytest.raises(ConfigError, match="true or false"):
        load_config(["--config", str(file)], env=env)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--api-tls-cert", "c.pem"], "go together"),
        (["--api-tls-key", "k.pem"], "go together"),
        (["--api-tls-ca", "ca.pem"], "needs api-tls-cert"),
    ],
)
def test_api_tls_flags_go_together(flags: list[str], message: str, root: bool) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(flags, env={})


def test_api_token_file_from_flag_and_toml(tmp_path: Path, root: bool) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# ops\nread r3ad-only\n\nwrite wr1te\n")
    cfg = load_config(
        [
            "--api-token-file",
            str(tokens),
            "--api-token",
            "fl4g",
            "--api",
            "10.1.2.3:2377",
            "--api-insecure",
        ],
        env={},
    )
    assert cfg.api_tokens.scope_of(b"r3ad-only") is Scope.READ
    assert cfg.api_tokens.scope_of(b"wr1te") is Scope.WRITE
    assert cfg.api_tokens.scope_of(b"fl4g") is Scope.WRITE  # --api-token: write
    assert cfg.api_tokens.scope_of(b"nope") is None
    shown = describe(cfg)
    assert shown["api_tokens"] == "read=1,write=2"
    assert shown["api_token_file"] == str(tokens)
    for secret in ("r3ad-only", "wr1te", "fl4g"):
        assert secret not in repr(cfg) and secret not in str(shown)
    file = tmp_path / "agent.toml"
    file.write_text(
        f'api-token-file = "{tokens}"\napi = "0.0.0.0:1"\napi_tls_cert = "c"\n'
        'api-tls-key = "k"\napi-tls-ca = "ca"\n'
    )
    cfg = load_config(["--config", str(file)], env={})
    assert cfg.api_tokens.count(Scope.READ) == 1
    assert (cfg.api_tls_cert, cfg.api_tls_key, cfg.api_tls_ca) == (Path("c"), Path("k"), Path("ca"))


def test_a_bad_api_token_file_is_a_start_error_naming_the_line(tmp_path: Path, root: bool) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("read fine-token\n# note\nadmin t0psecret\n")
    with pytest.raises(ConfigError, match=f"api-token-file {tokens} line 3: ") as caught:
        load_config(["--api-token-file", str(tokens)], env={})
    assert "t0psecret" not in str(caught.value) and "admin" not in str(caught.value)
    with pytest.raises(ConfigError, match=r"cannot read api-token-file .*: No such file"):
        load_config(["--api-token-file", str(tmp_path / "absent")], env={})


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


# -- gossip: secure by default --------------------------------------------------------

TOKEN_KEY = bytes(range(32))


def _token(label: str = "") -> str:
    from gossip import join_token

    return join_token.encode([TOKEN_KEY], label)


def test_a_join_token_comes_from_the_flag_a_file_or_the_environment(tmp_path: Path) -> None:
    token = _token("prod")
    assert load_config(["--token", token], env={}).join_token is not None
    file = tmp_path / "token"
    file.write_text(token + "\n")
    from_file = load_config(["--token-file", str(file)], env={})
    from_env = load_config([], env={"MESH_JOIN_TOKEN": token})
    for cfg in (from_file, from_env):
        assert cfg.join_token is not None and cfg.join_token.keys == (TOKEN_KEY,)
        assert cfg.cluster_label == "prod"  # the token carries the label


def test_the_token_is_never_shown(tmp_path: Path) -> None:
    cfg = load_config(["--token", _token()], env={})
    assert config.describe(cfg)["join_token"] == "set"
    assert "join_token" not in repr(cfg)


@pytest.mark.parametrize(
    ("argv", "env", "says"),
    [
        (["--token", "mesh1.AAAA"], {}, "--token: the join token is too short"),
        ([], {"MESH_JOIN_TOKEN": "nope"}, "MESH_JOIN_TOKEN: a join token starts with"),
        (["--token-file", "/nonexistent/token"], {}, "cannot read token file"),
        (["--insecure-gossip", "--keyring", "/k"], {}, "--insecure-gossip runs gossip"),
        (["--keyring", "/k", "--token", "TOKEN"], {}, "--keyring FILE or a join token"),
        (["--cluster-label", "dev", "--token", "TOKEN:prod"], {}, "differs from the join"),
        (["--gossip-verify-incoming", "maybe"], {}, "gossip-verify-incoming 'maybe': on or off"),
    ],
)
def test_bad_gossip_security_flags_are_start_errors(
    argv: list[str], env: dict[str, str], says: str
) -> None:
    argv = [_token("prod") if a == "TOKEN:prod" else _token() if a == "TOKEN" else a for a in argv]
    with pytest.raises(ConfigError, match=re.escape(says)):
        load_config(argv, env=env)


def test_explicit_keyring_or_insecure_win_over_the_environment_token() -> None:
    env = {"MESH_JOIN_TOKEN": _token()}
    assert load_config(["--insecure-gossip"], env=env).join_token is None
    assert load_config(["--keyring", "/k"], env=env).join_token is None


def test_insecure_gossip_and_verify_flags_in_the_file(tmp_path: Path) -> None:
    file = tmp_path / "agent.toml"
    file.write_text("insecure-gossip = true\ngossip-verify-outgoing = 'off'\n")
    cfg = load_config(["--config", str(file)], env={})
    assert cfg.insecure_gossip and not cfg.gossip_verify_outgoing and cfg.gossip_verify_incoming
    assert not load_config([], env={}).insecure_gossip


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


def test_lb_outlier_detection_is_on_by_default_and_can_be_turned_off() -> None:
    assert load_config([], env={}).lb_outlier_detection is True
    assert load_config(["--lb-outlier-detection", "off"], env={}).lb_outlier_detection is False
    assert load_config(["--lb-outlier-detection", "on"], env={}).lb_outlier_detection is True
    with pytest.raises(ConfigError, match="lb-outlier-detection"):
        load_config(["--lb-outlier-detection", "maybe"], env={})
