"""A worker's command line (mesh.core.workerargs): what the agent writes, the worker reads
back whole; anything else is refused with a reason, and the worker exits 2 on it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dns.worker import DnsWorkerArgs
from lb.http.worker import HttpWorkerArgs
from mesh.core.workerargs import WorkerArgsError, read_worker_args, worker_command

REPO = Path(__file__).resolve().parents[2]


def test_what_the_agent_writes_the_worker_reads_back() -> None:
    dns = DnsWorkerArgs(feed="/run/f", host="127.0.0.1", port=53, upstream=["1.1.1.1:53"])
    argv = worker_command("dns.worker", dns)
    assert argv[:3] == [sys.executable, "-m", "dns.worker"] and len(argv) == 4
    assert read_worker_args(DnsWorkerArgs, argv[3:]) == dns
    http = HttpWorkerArgs(
        feed="/run/f", host="::1", port=80, tls_cert=["a=c,k"], settings={"retries": 2}
    )
    assert read_worker_args(HttpWorkerArgs, worker_command("lb.http.worker", http)[3:]) == http


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        ([], "expected one argument"),
        (["{}", "{}"], "expected one argument"),
        (["--feed"], "not JSON"),
        (["[1]"], "expected a JSON object"),
        (['{"feed": "f", "host": "h", "port": 1, "colour": 1}'], "unknown field(s) ['colour']"),
        (['{"feed": "f", "host": "h"}'], "port"),
        (['{"feed": "f", "host": "h", "port": "53"}'], "port: '53' is not"),
        (['{"feed": "f", "host": "h", "port": true}'], "port: True is not"),
        (['{"feed": "f", "host": "h", "port": 1, "upstream": [5]}'], "upstream: [5]"),
        (['{"feed": "f", "host": "h", "port": 1, "domain": 5}'], "domain: 5"),
    ],
)
def test_anything_else_is_refused_with_its_reason(argv: list[str], says: str) -> None:
    with pytest.raises(WorkerArgsError) as refused:
        read_worker_args(DnsWorkerArgs, argv)
    assert says in str(refused.value)


def test_a_worker_started_with_bad_arguments_says_why_and_exits_2() -> None:
    for module in ("dns.worker", "lb.http.worker"):
        done = subprocess.run(
            [sys.executable, "-m", module, json.dumps({"feed": 1})],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith(f"python -m {module}: feed: 1 is not")
