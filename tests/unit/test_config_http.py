"""The HTTP routing mesh's flags: parsing, defaults and the errors for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.config import ConfigError, HostPort, load_config


def test_defaults() -> None:
    cfg = load_config([], env={})
    assert cfg.http_workers == 0 and cfg.https is None and cfg.tls_certs == ()
    assert not cfg.http_access_log
    assert cfg.http_header_timeout == 10.0 and cfg.http_upstream_timeout == 60.0
    assert cfg.http_max_body == 1 << 30
    assert cfg.http_body_deadline == 3600.0 and cfg.http_body_min_rate == 1024


def test_body_time_flags_are_read() -> None:
    cfg = load_config(["--http-body-deadline", "0", "--http-body-min-rate", "4096"], env={})
    assert cfg.http_body_deadline == 0 and cfg.http_body_min_rate == 4096


def test_http_none_disables_the_router() -> None:
    assert load_config(["--http", "none"], env={}).http is None


def test_every_flag_is_read() -> None:
    cfg = load_config(
        [
            "--http",
            "127.0.0.1:8081",
            "--http-workers",
            "3",
            "--https",
            "0.0.0.0:8443",
            "--tls-cert",
            "a.example=a.pem,a.key",
            "--tls-cert",
            "*.b.example=b.pem,b.key",
            "--http-access-log",
            "on",
            "--http-header-timeout",
            "2.5",
            "--http-upstream-timeout",
            "30",
            "--http-max-body",
            "0",
        ],
        env={},
    )
    assert cfg.http == HostPort("127.0.0.1", 8081) and cfg.http_workers == 3
    assert cfg.https == HostPort("0.0.0.0", 8443)
    assert cfg.tls_certs == ("a.example=a.pem,a.key", "*.b.example=b.pem,b.key")
    assert cfg.http_access_log and cfg.http_header_timeout == 2.5
    assert cfg.http_upstream_timeout == 30 and cfg.http_max_body == 0


def test_the_config_file_takes_a_list_of_certificates(tmp_path: Path) -> None:
    file = tmp_path / "agent.toml"
    file.write_text('https = "127.0.0.1:8443"\ntls-cert = ["a=a.pem,a.key"]\nhttp-workers = 2\n')
    cfg = load_config(["--config", str(file)], env={})
    assert cfg.tls_certs == ("a=a.pem,a.key",) and cfg.http_workers == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--http-workers", "65"], "http-workers"),
        (["--http-workers", "many"], "is not a number"),
        (["--http-header-timeout", "0"], "positive"),
        (["--http-max-body", "-1"], "http-max-body"),
        (["--http-body-deadline", "-1"], "http-body-deadline"),
        (["--http-body-min-rate", "-5"], "http-body-min-rate"),
        (["--https", "127.0.0.1:8443", "--tls-cert", "nocomma=a.pem"], "HOST=CERTFILE,KEYFILE"),
        (["--https", "127.0.0.1:8443", "--tls-cert", "a.pem,a.key"], "HOST=CERTFILE,KEYFILE"),
        (["--tls-cert", "a=a.pem,a.key"], "needs --https"),
        (["--http-access-log", "maybe"], "on or off"),
        (["--https", "nowhere"], "ADDR:PORT"),
    ],
)
def test_bad_values_are_refused(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(argv, env={})
