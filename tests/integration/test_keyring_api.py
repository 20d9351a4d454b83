"""/v1/keyring and `mesh keygen | keyring ...` over real HTTP on loopback.

The API is `make_app` served from a thread of its own, with a
`LocalKeyringControl` (apply on this node, persist to the keyring file) in its
`ApiDeps`, so that synchronous clients — urllib, the CLI's `main`, schemathesis
— talk to it as they would to an agent. The last test starts a real agent with
`--keyring FILE`; it is skipped while the agent does not hand a keyring
control to its API.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gossip.keyring_store import LocalKeyringControl, load_keyring, save_keyring
from gossip.security import Keyring, KeyringControl, fingerprint
from mesh.api.app import ApiDeps, make_app
from mesh.api.models import KeyringOut
from mesh.api.openapi import build_openapi
from mesh.cli.main import main
from mesh.control import Control
from mesh.core.feed import ChangeFeed
from mesh.ipam import Ipam, parse_pool
from mesh.state.persist import StateWriter
from mesh.state.store import Store
from tests.helpers.agent import AgentProcess, free_port
from tests.integration.conftest import StartAgent

K1 = bytes(range(32))
K2 = bytes(range(32, 64))
K3 = bytes(range(64, 80))


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def listing(*keys: bytes) -> dict[str, Any]:
    """The answer for a keyring holding `keys`, the primary first."""
    return {
        "keys": [{"fingerprint": fingerprint(k), "primary": i == 0} for i, k in enumerate(keys)]
    }


def _deps(data_dir: Path, keyring: KeyringControl | None) -> ApiDeps:
    # A real Control whose writer is never started: the keyring routes do not touch it.
    store = Store("node-1", Ipam(parse_pool("127.64.0.0/12")), random.Random(1))
    control = Control(
        store, ChangeFeed(store.all_records), StateWriter(data_dir), time.time, lambda reason: None
    )
    return ApiDeps(
        control=control,
        node="node-1",
        members=list,
        heartbeat=lambda task, healthy, output: None,
        drain_grace=0.5,
        keyring=keyring,
    )


class ServedApp:
    """`make_app(deps)` on a free loopback port, its event loop in a thread of its own."""

    def __init__(self, deps: ApiDeps) -> None:
        from aiohttp import web

        self.address = f"127.0.0.1:{free_port()}"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner = web.AppRunner(make_app(deps), access_log=None)
        self._web = web

    def start(self) -> ServedApp:
        self._thread.start()
        host, port = self.address.split(":")
        asyncio.run_coroutine_threadsafe(self._start(host, int(port)), self._loop).result(10)
        return self

    async def _start(self, host: str, port: int) -> None:
        await self._runner.setup()
        await self._web.TCPSite(self._runner, host, port).start()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def request(
        self, method: str, path: str, body: Any = None, raw: bytes | None = None
    ) -> tuple[int, Any]:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(
            f"http://{self.address}{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"null")


@pytest.fixture
def keyring_file(tmp_path: Path) -> Path:
    path = tmp_path / "keyring.json"
    save_keyring(path, Keyring([K1]))
    return path


@pytest.fixture
def served(tmp_path: Path, keyring_file: Path) -> Iterator[ServedApp]:
    control = LocalKeyringControl(load_keyring(keyring_file), keyring_file)
    app = ServedApp(_deps(tmp_path, control)).start()
    yield app
    app.stop()


@pytest.fixture
def served_without_keyring(tmp_path: Path) -> Iterator[ServedApp]:
    app = ServedApp(_deps(tmp_path, None)).start()
    yield app
    app.stop()


def error_code(answer: Any) -> str:
    code: str = answer["error"]["code"]
    return code


# -- the API ---------------------------------------------------------------------


def test_list_shows_fingerprints_never_keys(served: ServedApp) -> None:
    status, answer = served.request("GET", "/v1/keyring")
    assert (status, answer) == (200, listing(K1))
    assert b64(K1) not in json.dumps(answer)
    KeyringOut.model_validate(answer)


def test_rotation_through_the_api_is_persisted_at_each_step(
    served: ServedApp, keyring_file: Path
) -> None:
    assert served.request("POST", "/v1/keyring", {"key": b64(K2)}) == (200, listing(K1, K2))
    assert load_keyring(keyring_file).keys() == [K1, K2]
    assert served.request("PUT", "/v1/keyring/primary", {"key": b64(K2)}) == (200, listing(K2, K1))
    assert load_keyring(keyring_file).keys() == [K2, K1]
    assert served.request("POST", "/v1/keyring/remove", {"key": b64(K1)}) == (200, listing(K2))
    assert load_keyring(keyring_file).keys() == [K2]


def test_install_and_remove_are_idempotent(served: ServedApp) -> None:
    assert served.request("POST", "/v1/keyring", {"key": b64(K1)}) == (200, listing(K1))
    assert served.request("POST", "/v1/keyring/remove", {"key": b64(K3)}) == (200, listing(K1))


def test_removing_the_primary_is_a_conflict(served: ServedApp, keyring_file: Path) -> None:
    status, answer = served.request("POST", "/v1/keyring/remove", {"key": b64(K1)})
    assert (status, error_code(answer)) == (409, "primary_key")
    assert load_keyring(keyring_file).keys() == [K1]


def test_using_a_key_not_installed_is_invalid(served: ServedApp) -> None:
    status, answer = served.request("PUT", "/v1/keyring/primary", {"key": b64(K2)})
    assert (status, error_code(answer)) == (422, "unknown_key")
    assert served.request("GET", "/v1/keyring") == (200, listing(K1))


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"key": "not base64!"}, 422, "invalid_key"),
        ({"key": b64(b"k" * 20)}, 422, "invalid_key"),
        ({"key": ""}, 422, "invalid_value"),
        ({"key": 42}, 422, "invalid_value"),
        ({}, 422, "missing_field"),
        ({"key": b64(K2), "primary": True}, 400, "unknown_field"),
        ([], 400, "malformed_json"),
    ],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v1/keyring"), ("PUT", "/v1/keyring/primary"), ("POST", "/v1/keyring/remove")],
)
def test_bad_bodies_answer_in_the_error_shape(
    served: ServedApp, method: str, path: str, body: Any, status: int, code: str
) -> None:
    got, answer = served.request(method, path, body)
    assert (got, error_code(answer)) == (status, code)
    assert served.request("GET", "/v1/keyring") == (200, listing(K1))


def test_a_body_that_is_not_json_is_malformed(served: ServedApp) -> None:
    status, answer = served.request("POST", "/v1/keyring", raw=b"{not json")
    assert (status, error_code(answer)) == (400, "malformed_json")


def test_a_change_that_cannot_be_persisted_answers_503_and_changes_nothing(tmp_path: Path) -> None:
    keyring = Keyring([K1])
    control = LocalKeyringControl(keyring, tmp_path / "gone" / "keyring.json")
    app = ServedApp(_deps(tmp_path, control)).start()
    try:
        status, answer = app.request("POST", "/v1/keyring", {"key": b64(K2)})
        assert (status, error_code(answer)) == (503, "unavailable")
        assert keyring.keys() == [K1]
    finally:
        app.stop()


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/v1/keyring", None),
        ("POST", "/v1/keyring", {"key": b64(K2)}),
        ("PUT", "/v1/keyring/primary", {"key": b64(K2)}),
        ("POST", "/v1/keyring/remove", {"key": b64(K2)}),
    ],
)
def test_without_a_keyring_every_route_is_a_conflict(
    served_without_keyring: ServedApp, method: str, path: str, body: Any
) -> None:
    status, answer = served_without_keyring.request(method, path, body)
    assert (status, error_code(answer)) == (409, "keyring_disabled")


def test_the_description_has_the_keyring_routes() -> None:
    paths = build_openapi()["paths"]
    assert set(paths["/v1/keyring"]) == {"get", "post"}
    assert set(paths["/v1/keyring/primary"]) == {"put"}
    assert set(paths["/v1/keyring/remove"]) == {"post"}


# -- the API against its description ---------------------------------------------

SCHEMA = schemathesis.openapi.from_dict(
    json.loads(json.dumps(build_openapi())),
    config=schemathesis.Config.from_dict(
        {
            "seed": 20_260_102,
            "generation": {"max-examples": 60, "deterministic": True, "database": "none"},
        }
    ),
)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedApp]:
    directory = tmp_path_factory.mktemp("keyring-fuzz")
    control = LocalKeyringControl(Keyring([K1]), directory / "keyring.json")
    app = ServedApp(_deps(directory, control)).start()
    yield app
    app.stop()


@SCHEMA.include(path_regex="^/v1/keyring").parametrize()
def test_keyring_routes_conform_to_their_description(
    case: schemathesis.Case[Any], fuzzed: ServedApp
) -> None:
    case.call_and_validate(
        base_url=f"http://{fuzzed.address}",
        timeout=10,
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
        ],
    )


# -- the CLI ---------------------------------------------------------------------


def test_keygen_needs_no_agent(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--api", "127.0.0.1:9", "keygen"]) == 0
    assert len(base64.b64decode(capsys.readouterr().out.strip(), validate=True)) == 32
    assert main(["keygen", "--json"]) == 0
    assert len(base64.b64decode(json.loads(capsys.readouterr().out)["key"])) == 32


def test_cli_rotates_the_keyring(
    served: ServedApp, keyring_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    api = ["--api", served.address]
    assert main([*api, "keyring", "install", b64(K2)]) == 0
    assert main([*api, "keyring", "use", b64(K2)]) == 0
    assert main([*api, "keyring", "remove", b64(K1)]) == 0
    capsys.readouterr()
    assert main([*api, "keyring", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["FINGERPRINT", "PRIMARY"]
    assert out[1].split() == [fingerprint(K2), "yes"]
    assert len(out) == 2
    assert load_keyring(keyring_file).keys() == [K2]


def test_cli_json_prints_a_bare_array(
    served: ServedApp, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--api", served.address, "keyring", "install", b64(K3), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == listing(K1, K3)["keys"]
    assert main(["--api", served.address, "keyring", "ls", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == listing(K1, K3)["keys"]


def test_cli_reads_a_key_from_stdin(
    served: ServedApp, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO(b64(K2) + "\n"))
    assert main(["--api", served.address, "keyring", "install", "-"]) == 0
    assert fingerprint(K2) in capsys.readouterr().out


def test_cli_reports_refusals_on_one_line(
    served: ServedApp, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--api", served.address, "keyring", "remove", b64(K1)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mesh: ") and "(primary_key)" in err and err.count("\n") == 1
    assert main(["--api", served.address, "keyring", "install", "nope"]) == 1
    assert "(invalid_key)" in capsys.readouterr().err


# -- a real agent ----------------------------------------------------------------


def test_agent_with_keyring_file_serves_and_persists_it(
    start_agent: StartAgent, keyring_file: Path
) -> None:
    agent: AgentProcess = start_agent(extra=["--keyring", str(keyring_file)])
    status, answer = agent.request("GET", "/v1/keyring")
    if status == 409 and error_code(answer) == "keyring_disabled":
        pytest.skip("the agent does not give its API a keyring control yet")
    assert (status, answer) == (200, listing(K1))
    assert agent.request("POST", "/v1/keyring", {"key": b64(K2)})[0] == 200
    assert K2 in load_keyring(keyring_file)
