"""The API over TLS (--api-tls-cert/--api-tls-key) and mTLS (--api-tls-ca), with curl
and with the `mesh` CLI; certificates made here with `cryptography`."""

from __future__ import annotations

import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.agent import REPO, AgentProcess, free_port
from tests.helpers.certs import Authority
from tests.helpers.netns import Lab, Netns, unavailable
from tests.integration.conftest import stop_and_check

WRITE = "tls-wr1te-t0ken"
READ = "tls-r3ad-t0ken"


@dataclass(frozen=True)
class Pki:
    ca: Authority
    server: tuple[Path, Path]
    client: tuple[Path, Path]
    #: a client certificate of another CA: refused by the mTLS agent
    stranger: tuple[Path, Path]
    tokens: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca = Authority(root, "mesh")
    other = Authority(root, "other")
    tokens = root / "tokens"
    tokens.write_text(f"write {WRITE}\nread {READ}\n")
    token_file = root / "cli-token"
    token_file.write_text(f"{WRITE}\n")
    return Pki(
        ca=ca,
        server=ca.issue("127.0.0.1", server=True),
        client=ca.issue("operator", server=False),
        stranger=other.issue("intruder", server=False),
        tokens=tokens,
    )


def client_context(pki: Pki, with_cert: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca.cert))
    if with_cert:
        context.load_cert_chain(*pki.client)
    return context


def tls_flags(pki: Pki, *, mtls: bool) -> list[str]:
    flags = ["--api-tls-cert", str(pki.server[0]), "--api-tls-key", str(pki.server[1])]
    flags += ["--api-token-file", str(pki.tokens)]
    return flags + (["--api-tls-ca", str(pki.ca.cert)] if mtls else [])


@pytest.fixture(scope="module")
def https_agent(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    agent = AgentProcess(
        tmp_path_factory.mktemp("tls") / "data",
        extra=tls_flags(pki, mtls=False),
        tls=client_context(pki, with_cert=False),
    )
    agent.start()
    yield agent
    stop_and_check(agent)


@pytest.fixture(scope="module")
def mtls_agent(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    agent = AgentProcess(
        tmp_path_factory.mktemp("mtls") / "data",
        extra=tls_flags(pki, mtls=True),
        tls=client_context(pki),
    )
    agent.start()
    yield agent
    stop_and_check(agent)


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_https_with_curl(https_agent: AgentProcess, pki: Pki) -> None:
    url = f"https://{https_agent.api}"
    auth = ["-H", f"Authorization: Bearer {WRITE}"]
    done = curl("--cacert", str(pki.ca.cert), *auth, f"{url}/v1/networks")
    assert (done.returncode, done.stdout) == (0, "200"), done
    done = curl("--cacert", str(pki.ca.cert), "-H", f"Authorization: Bearer {READ}",
                "-X", "POST", "-d", "{}", f"{url}/v1/networks")  # fmt: skip
    assert (done.returncode, done.stdout) == (0, "403"), done
    done = curl("--cacert", str(pki.ca.cert), f"{url}/v1/networks")
    assert (done.returncode, done.stdout) == (0, "401"), done
    # An agent's certificate curl has no CA for is refused by curl (60: not verified).
    done = curl(*auth, f"{url}/v1/networks")
    assert done.returncode == 60, done
    # Plain HTTP to the TLS port gets no HTTP answer at all.
    done = curl(*auth, f"http://{https_agent.api}/v1/networks")
    assert done.returncode != 0 or done.stdout != "200", done


def test_without_tls_ca_no_client_certificate_is_asked(https_agent: AgentProcess, pki: Pki) -> None:
    done = curl("--cacert", str(pki.ca.cert), f"https://{https_agent.api}/v1/health")
    assert (done.returncode, done.stdout) == (0, "200"), done


def test_mtls_refuses_a_client_without_a_certificate_signed_by_the_ca(
    mtls_agent: AgentProcess, pki: Pki
) -> None:
    url = f"https://{mtls_agent.api}/v1/health"  # open without a token: TLS alone decides
    base = ["--cacert", str(pki.ca.cert)]
    done = curl(*base, url)
    assert done.returncode != 0 and done.stdout == "000", done
    print(f"no client certificate: curl exit {done.returncode}: {done.stderr.strip()}")
    done = curl(*base, "--cert", str(pki.stranger[0]), "--key", str(pki.stranger[1]), url)
    assert done.returncode != 0 and done.stdout == "000", done
    print(f"a certificate of another CA: curl exit {done.returncode}: {done.stderr.strip()}")
    done = curl(*base, "--cert", str(pki.client[0]), "--key", str(pki.client[1]), url)
    assert (done.returncode, done.stdout) == (0, "200"), done
    # The tokens apply on top of the certificate.
    cert = ["--cert", str(pki.client[0]), "--key", str(pki.client[1])]
    done = curl(*base, *cert, f"https://{mtls_agent.api}/v1/networks")
    assert (done.returncode, done.stdout) == (0, "401"), done
    done = curl(*base, *cert, "-H", f"Authorization: Bearer {READ}",
                f"https://{mtls_agent.api}/v1/networks")  # fmt: skip
    assert (done.returncode, done.stdout) == (0, "200"), done
    # A refused handshake is no log line (a hostile peer cannot fill the log).
    log = mtls_agent.log().lower()
    assert "handshake" not in log and "traceback" not in log and "ssl" not in log


def mesh_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    return subprocess.run(
        [sys.executable, "-m", "mesh", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**clean, "PYTHONPATH": str(REPO), **(env or {})},
        check=False,
    )


def test_the_cli_over_mtls(mtls_agent: AgentProcess, pki: Pki) -> None:
    token_file = pki.tokens.parent / "cli-token"
    api = f"https://{mtls_agent.api}"
    tls = ["--ca-cert", str(pki.ca.cert), "--cert", str(pki.client[0]), "--key", str(pki.client[1])]
    done = mesh_cli("--api", api, *tls, "--token-file", str(token_file), "network", "ls", "--json")
    assert done.returncode == 0, done
    assert '"ingress"' in done.stdout
    # The same from the environment, the token from MESH_API_TOKEN.
    env = {
        "MESH_API": api,
        "MESH_CA_CERT": str(pki.ca.cert),
        "MESH_CLIENT_CERT": str(pki.client[0]),
        "MESH_CLIENT_KEY": str(pki.client[1]),
        "MESH_API_TOKEN": WRITE,
    }
    done = mesh_cli("network", "create", "front", env=env)
    assert done.returncode == 0, done
    # A read token cannot write: the agent's 403 as the CLI's one line.
    done = mesh_cli("network", "rm", "front", env={**env, "MESH_API_TOKEN": READ})
    assert done.returncode == 1
    assert "(insufficient_scope)" in done.stderr, done
    # Without the client certificate: refused in the handshake, said in one line.
    done = mesh_cli("--api", api, "--ca-cert", str(pki.ca.cert), "--token-file",
                    str(token_file), "members")  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.startswith(f"mesh: cannot reach the agent at {mtls_agent.api}: ")
    assert len(done.stderr.strip().splitlines()) == 1, done
    # Without the CA: the agent's certificate is not trusted.
    done = mesh_cli("--api", api, "members", env={"MESH_API_TOKEN": WRITE})
    assert done.returncode == 1
    assert "CERTIFICATE_VERIFY_FAILED" in done.stderr or "certificate" in done.stderr, done
    assert WRITE not in done.stderr


def test_a_certificate_that_does_not_load_stops_the_start(pki: Pki, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    argv = [sys.executable, "-m", "mesh", "agent", "--data-dir", str(tmp_path / "data"),
            "--api", f"127.0.0.1:{free_port()}", "--dns", "none", "--http", "none"]  # fmt: skip
    for flags, message in [
        (["--api-tls-cert", str(bad), "--api-tls-key", str(pki.server[1])],
         f"mesh agent: api-tls-cert {bad} with api-tls-key {pki.server[1]}: cannot load: "
         "not a PEM certificate and key"),
        (["--api-tls-cert", str(pki.server[0]), "--api-tls-key", str(pki.client[1])],
         "cannot load: KEY_VALUES_MISMATCH"),
        (["--api-tls-cert", str(pki.server[0]), "--api-tls-key", str(pki.server[1]),
          "--api-tls-ca", str(bad)], f"mesh agent: api-tls-ca {bad}: cannot load: "),
    ]:  # fmt: skip
        started = time.monotonic()
        done = subprocess.run(
            [*argv, *flags],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            check=False,
        )
        assert done.returncode == 1, done
        last = done.stderr.strip().splitlines()[-1]
        assert message in last, done.stderr
        print(f"{last} ({time.monotonic() - started:.1f} s)")


def test_a_public_plain_http_api_is_refused_without_api_insecure(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "mesh", "agent", "--data-dir", str(tmp_path / "data"),
            "--api", "0.0.0.0:2377", "--api-token", WRITE]  # fmt: skip
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    assert done.returncode == 2, done
    assert done.stderr.startswith(
        "mesh agent: the API on 0.0.0.0:2377 is reachable from other hosts in plain HTTP"
    )
    assert "--api-insecure" in done.stderr and WRITE not in done.stderr


# -- a non-loopback API, in a namespace of this test ------------------------------------

PUBLIC = "10.254.77.1"


@pytest.fixture
def lab() -> Iterator[Lab]:
    why = unavailable()
    if why:
        pytest.skip(why)
    with Lab("mpapi") as made:
        yield made


def wait_answering(ns: Netns, proc: subprocess.Popen[bytes], curl_args: list[str]) -> None:
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, f"the agent exited with {proc.returncode}"
        done = ns.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", *curl_args],
                      check=False)  # fmt: skip
        if done.stdout == "200":
            return
        assert time.monotonic() < deadline, done
        time.sleep(0.1)


def test_a_public_api_in_plain_http_with_api_insecure_or_in_tls(
    lab: Lab, pki: Pki, tmp_path: Path
) -> None:
    ns = lab.namespace("node")
    # Not a loopback address, though on lo: what the agent checks is the address.
    ns.add_address("lo", f"{PUBLIC}/32")
    cert, key = pki.ca.issue(PUBLIC, server=True)
    drop = ["setpriv", "--bounding-set", "-sys_admin", "--"] if shutil.which("setpriv") else []

    def agent(name: str, port: int, flags: list[str]) -> tuple[subprocess.Popen[bytes], Path]:
        log = tmp_path / f"{name}.log"
        argv = [*drop, sys.executable, "-m", "mesh", "agent", "--node-name", name,
                "--data-dir", str(tmp_path / name), "--api", f"{PUBLIC}:{port}",
                "--advertise", f"127.0.0.1:{7946 + port - 2377}", "--dns", "none",
                "--http", "none", "--lb", "userspace", "--api-token", WRITE, *flags]  # fmt: skip
        with log.open("wb") as out:
            proc = ns.popen(
                argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )  # fmt: skip
        return proc, log

    plain, plain_log = agent("plain", 2377, ["--api-insecure"])
    secure, secure_log = agent(
        "secure", 2378, ["--api-tls-cert", str(cert), "--api-tls-key", str(key)]
    )
    secure_log_text = ""
    try:
        auth = ["-H", f"Authorization: Bearer {WRITE}"]
        wait_answering(ns, plain, [*auth, f"http://{PUBLIC}:2377/v1/networks"])
        done = ns.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                       f"http://{PUBLIC}:2377/v1/networks"], check=False)  # fmt: skip
        assert done.stdout == "401"
        warned = re.search(r"level=warning \S+ event=api_plaintext", plain_log.read_text())
        assert warned, plain_log.read_text()
        # Without --api-insecure the same agent needs TLS; with it, no warning.
        tls = ["--cacert", str(pki.ca.cert), *auth]
        wait_answering(ns, secure, [*tls, f"https://{PUBLIC}:2378/v1/networks"])
        secure_log_text = secure_log.read_text()
        assert "api_plaintext" not in secure_log_text
        assert "tls=True" in secure_log_text
    finally:
        for proc in (plain, secure):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(20)
    for text in (plain_log.read_text(), secure_log.read_text()):
        assert WRITE not in text and READ not in text
