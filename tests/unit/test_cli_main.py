"""The mesh entry point without an agent: parsing, delegation, usage errors and exit codes."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from mesh.cli import client as client_module
from mesh.cli.client import base_url
from mesh.cli.errors import CliError
from mesh.cli.main import build_parser, main


@pytest.fixture(autouse=True)
def no_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing here may reach an agent: every request fails the test."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a unit test sent a request")

    monkeypatch.setattr(client_module.Client, "request", refuse)
    monkeypatch.setattr(client_module.Client, "_send", refuse)  # get_all's pages
    monkeypatch.delenv("MESH_API", raising=False)
    for name in ("MESH_API_TOKEN", "MESH_API_TOKEN_FILE", "MESH_CA_CERT", "MESH_CLIENT_CERT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("MESH_CLIENT_KEY", raising=False)


@pytest.mark.parametrize(
    "argv",
    [
        ["--api", "h:1", "--token", "t", "--json", "service", "ls"],
        ["service", "ls", "--api", "h:1", "--token", "t", "--json"],
        ["--api", "h:1", "service", "--token", "t", "ls", "--json"],
        ["--api", "other:2", "service", "ls", "--api", "h:1", "--token=t", "--json"],
    ],
)
def test_global_options_go_before_or_after_the_command(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert (args.api, args.token, args.json) == ("h:1", "t", True)


def test_global_options_default_to_unset() -> None:
    args = build_parser().parse_args(["members"])
    assert (args.api, args.token, args.json) == (None, None, False)


def test_agent_is_delegated_verbatim(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def agent_main(argv: list[str]) -> int:
        seen.append(argv)
        return 7

    fake = types.ModuleType("mesh.agent")
    fake.main = agent_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mesh.agent", fake)
    assert main(["agent", "--help", "--json", "--join", "a:1", "x"]) == 7
    assert main(["agent"]) == 7
    assert seen == [["--help", "--json", "--join", "a:1", "x"], []]


def test_agent_after_global_options_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--json", "agent", "--node-name", "a"]) == 2
    assert "write them after it" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["network"],
        ["bogus"],
        ["service", "create"],
        ["task", "add", "web"],
        ["service", "update", "web", "--health-check", "tcp", "--no-health-check"],
        ["service", "create", "web", "--endpoint-mode", "rr"],
        ["members", "--nope"],
    ],
)
def test_bad_usage_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "usage: mesh" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--help"], ["service", "create", "--help"], ["task", "-h"]])
def test_help_exits_0(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 0
    assert "usage: mesh" in capsys.readouterr().out


def test_help_documents_the_grammars(capsys: pytest.CaptureFixture[str]) -> None:
    main(["service", "update", "--help"])
    out = capsys.readouterr().out
    assert "published=PUB,target=TARGET[,protocol=tcp|udp][,mode=ingress|host]" in out
    assert "KIND[:ARG][,KEY=VALUE]..." in out
    assert "start_period=DURATION" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["service", "create", "web", "--health-check", "grpc"],
            "mesh: invalid --health-check 'grpc': kind 'grpc' is not one of http, tcp, ttl\n",
        ),
        (
            ["service", "create", "web", "-p", "8080:80/sctp"],
            "mesh: invalid --publish '8080:80/sctp': protocol 'sctp' is not one of tcp, udp\n",
        ),
        (
            ["service", "update", "web", "--publish-rm", "x"],
            "mesh: invalid --publish-rm 'x': published port 'x' is not a number\n",
        ),
        (
            ["service", "update", "web", "--publish-add", "80:"],
            "mesh: invalid --publish '80:': expected PUB:TARGET[/tcp|/udp], TARGET[/PROTO] "
            "or the long form\n",
        ),
        (
            ["task", "add", "web", "--address", "192.0.2.7", "--port", "80"],
            "mesh: invalid --port '80': expected TARGET=ACTUAL\n",
        ),
        (
            ["network", "create", "n", "--label", "=v"],
            "mesh: invalid --label '=v': the key is empty\n",
        ),
        (
            ["service", "update", "web"],
            "mesh: nothing to update: give at least one change (see --help)\n",
        ),
    ],
)
def test_a_bad_value_is_one_line_and_exit_2_before_any_request(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", message)


def test_a_bad_api_address_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--api", "ftp://h:1", "members"]) == 1
    assert (
        capsys.readouterr().err == "mesh: --api 'ftp://h:1' is not HOST:PORT or http://HOST:PORT\n"
    )


def test_an_unexpected_exception_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["members"]) == 1  # the fixture's AssertionError stands in for a bug
    assert capsys.readouterr().err == (
        "mesh: unexpected error: AssertionError: a unit test sent a request\n"
    )


@pytest.mark.parametrize(
    ("api", "url"),
    [
        ("127.0.0.1:2377", "http://127.0.0.1:2377"),
        ("agent.example:9000", "http://agent.example:9000"),
        ("agent.example", "http://agent.example:2377"),
        ("http://10.0.0.1:2377/", "http://10.0.0.1:2377"),
        ("https://10.0.0.1", "https://10.0.0.1:2377"),
        ("[::1]:2377", "http://[::1]:2377"),
        (" localhost:1 ", "http://localhost:1"),
    ],
)
def test_api_address(api: str, url: str) -> None:
    assert base_url(api) == url


@pytest.mark.parametrize(
    "api", ["", ":2377", "ftp://h:1", "h:port", "h:99999", "http://", "h:", "http://h:/"]
)
def test_api_address_refused(api: str) -> None:
    with pytest.raises(CliError, match="is not HOST:PORT"):
        base_url(api)


def test_the_cli_imports_no_third_party_package() -> None:
    """mesh/cli/__init__.py: a short-lived command imports only the standard library (and the
    project's own modules), not the agent's dependencies; `mesh doctor`'s DNS probe loads
    dnslib when it runs. A fresh interpreter, as `mesh` starts one."""
    code = (
        "import sys, mesh.cli.main\n"
        "own = {'mesh', 'gossip', 'dns', 'lb', '__main__'}\n"
        "print(sorted({m.split('.')[0] for m in sys.modules if not m.startswith('_')}"
        " - set(sys.stdlib_module_names) - own))\n"
    )
    stdout = _fresh_interpreter(code)
    assert stdout.strip() == "[]", stdout


def test_mesh_agent_imports_none_of_the_client_commands() -> None:
    """`mesh agent` goes through `mesh.cli.entry` straight to the agent: the client's
    parsers, HTTP client and doctor (~3 MB) stay out of the agent's process."""
    code = (
        "import atexit, sys\n"
        "atexit.register(lambda: print(sorted(m for m in sys.modules\n"
        "    if m.startswith(('mesh.cli.', 'mesh.doctor')))))\n"
        "sys.argv = ['mesh', 'agent', '--help']\n"
        "from mesh.cli.entry import main\n"
        "raise SystemExit(main())\n"
    )
    stdout = _fresh_interpreter(code)
    assert "usage: mesh agent" in stdout
    assert stdout.strip().splitlines()[-1] == "['mesh.cli.entry']", stdout[-500:]


def _fresh_interpreter(code: str) -> str:
    """What `python -c code` prints, run from the checkout as `mesh` runs."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    return done.stdout


def test_the_token_from_flag_file_or_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mesh.cli.main import _token

    def token(*argv: str) -> str | None:
        return _token(build_parser().parse_args([*argv, "members"]))

    file = tmp_path / "token"
    file.write_text("  fr0m-file\n")
    assert token() is None
    assert token("--token", "fl4g") == "fl4g"
    assert token("--token-file", str(file)) == "fr0m-file"
    monkeypatch.setenv("MESH_API_TOKEN_FILE", str(file))
    assert token() == "fr0m-file"
    monkeypatch.setenv("MESH_API_TOKEN", "fr0m-env")
    assert token() == "fr0m-env"  # the token itself before a file, as flags before env
    assert token("--token-file", str(file)) == "fr0m-file"  # a flag before the environment


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("", "is empty"),
        ("\n \n", "is empty"),
        ("write s3cret-t0ken\n", "must hold the token alone"),
        ("s3cret-t0ken\nother\n", "must hold the token alone"),
    ],
)
def test_a_token_file_that_holds_more_than_a_token_is_refused_without_echo(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, why: str
) -> None:
    file = tmp_path / "token"
    file.write_text(content)
    assert main(["--token-file", str(file), "members"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"mesh: --token-file {file} ") and why in err
    assert "s3cret" not in err


def test_token_and_token_file_together_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--token", "t", "--token-file", str(tmp_path / "f"), "members"]) == 2
    assert "not both" in capsys.readouterr().err


def test_tls_files_that_do_not_load_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    absent = tmp_path / "absent.pem"
    assert main(["--api", "https://127.0.0.1:1", "--ca-cert", str(absent), "members"]) == 1
    assert capsys.readouterr().err.startswith(f"mesh: --ca-cert {absent}: cannot load: ")
    assert main(["--api", "https://127.0.0.1:1", "--cert", str(absent), "members"]) == 1
    assert "--cert and --key go together" in capsys.readouterr().err


def test_version_prints_the_installed_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("mesh ") and out.split()[1][0].isdigit(), out
