"""Pages of the list endpoints against a real agent, read with curl: `?limit=N&after=`,
the `Link: <...>; rel="next"` header, the bare array kept for a client that passes no
limit (streamed in chunks when long), 422 on a bad limit or cursor; and `mesh task ls`,
which reads the list a page at a time (docs/api.md, "Pages")."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
from typing import Any

import pytest

from tests.helpers.agent import REPO, AgentProcess

TASKS = 620  # more than a streamed chunk (500) and than the CLI's page (500)


def curl(agent: AgentProcess, path: str) -> tuple[int, dict[str, list[str]], Any]:
    """(status, headers by lower-cased name, decoded body) of GET path, by curl."""
    done = subprocess.run(
        ["curl", "-sS", "--max-time", "20", "-D", "-", f"http://{agent.api}{path}"],
        capture_output=True,
        timeout=30,
        check=True,
    )
    head, _, body = done.stdout.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return int(lines[0].split()[1]), headers, json.loads(body)


def next_path(headers: dict[str, list[str]]) -> str | None:
    links = headers.get("link", [])
    assert len(links) <= 1
    if not links:
        return None
    found = re.fullmatch(r'<(/v1/[^>]+)>; rel="next"', links[0])
    assert found, links[0]
    return found.group(1)


def read_pages(agent: AgentProcess, path: str) -> tuple[list[Any], int]:
    items: list[Any] = []
    pages = 0
    following: str | None = path
    while following is not None:
        status, headers, body = curl(agent, following)
        assert status == 200, body
        assert isinstance(body, list)  # a page is the same bare array
        items.extend(body)
        pages += 1
        following = next_path(headers)
        assert pages <= 100
    return items, pages


@pytest.fixture(scope="module")
def loaded(module_agent: AgentProcess) -> AgentProcess:
    agent = module_agent
    for name in ("api", "db", "web"):
        assert agent.request("POST", "/v1/services", {"name": name})[0] == 201
    start = time.monotonic()
    for i in range(TASKS):
        service = ("web", "api", "db")[i % 3]
        body = {"address": f"10.20.{i >> 8}.{i & 255}"}
        status, answer = agent.request("POST", f"/v1/services/{service}/tasks", body)
        assert status == 201, answer
    took = time.monotonic() - start
    print(f"{TASKS} registrations over HTTP: {took / TASKS * 1000:.2f} ms each on average")
    return agent


def test_pages_walk_the_whole_list_in_its_order(loaded: AgentProcess) -> None:
    status, headers, whole = curl(loaded, "/v1/tasks")
    assert status == 200 and len(whole) == TASKS
    # past a chunk the list is streamed: chunked, not one Content-Length body
    assert headers.get("transfer-encoding") == ["chunked"]
    assert [(t["service"], t["slot"]) for t in whole] == sorted(
        (t["service"], t["slot"]) for t in whole
    )
    paged, pages = read_pages(loaded, "/v1/tasks?limit=100")
    assert pages == 7  # 6 full pages and 20 on the last, which has no Link
    assert paged == whole
    _, headers, first = curl(loaded, "/v1/tasks?limit=100")
    assert len(first) == 100 and next_path(headers) is not None


def test_a_page_keeps_the_filters_and_a_cursor_skips_what_went(loaded: AgentProcess) -> None:
    webs, pages = read_pages(loaded, "/v1/services/web/tasks?limit=50")
    assert pages == 5 and len(webs) == 207  # 620 round robin: web gets 207
    assert {t["service"] for t in webs} == {"web"}
    assert read_pages(loaded, "/v1/tasks?service=web&node_status=alive&limit=64")[0] == webs
    _, headers, first = curl(loaded, "/v1/tasks?service=web&limit=10")
    following = next_path(headers)
    assert following is not None and "service=web" in following
    # a task removed before the cursor does not shift the next page
    assert loaded.request("DELETE", f"/v1/tasks/{first[3]['id']}")[0] == 202
    assert curl(loaded, following)[2] == webs[10:20]


def test_services_networks_and_members_page_by_name(loaded: AgentProcess) -> None:
    names, pages = read_pages(loaded, "/v1/services?limit=2")
    assert [s["name"] for s in names] == ["api", "db", "web"] and pages == 2
    assert read_pages(loaded, "/v1/networks?limit=1")[0] == curl(loaded, "/v1/networks")[2]
    members, pages = read_pages(loaded, "/v1/members?limit=1")
    assert members == curl(loaded, "/v1/members")[2] and pages == len(members)


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("limit=0", "invalid_limit"),
        ("limit=1001", "invalid_limit"),
        ("limit=-5", "invalid_limit"),
        ("limit=ten", "invalid_limit"),
        ("after=not-a-cursor", "invalid_cursor"),
        ("after=" + base64.urlsafe_b64encode(b'["web"]').decode().rstrip("="), "invalid_cursor"),
        ("after=" + base64.urlsafe_b64encode(b'["web","1","x"]').decode(), "invalid_cursor"),
    ],
)
def test_a_bad_limit_or_cursor_is_a_422(loaded: AgentProcess, query: str, code: str) -> None:
    status, _, body = curl(loaded, f"/v1/tasks?{query}")
    assert (status, body["error"]["code"]) == (422, code)


def test_mesh_task_ls_reads_the_list_a_page_at_a_time(loaded: AgentProcess) -> None:
    # The list must hold still between the two reads: a task an earlier test removed
    # drains (0.5 s) and then leaves, which on a slow machine fell between them.
    deadline = time.monotonic() + 15
    while any(t["state"] == "draining" for t in curl(loaded, "/v1/tasks")[2]):
        assert time.monotonic() < deadline, "a draining task did not leave in 15 s"
        time.sleep(0.1)
    env = dict(os.environ, MESH_API=loaded.api, PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "-m", "mesh", "task", "ls", "--json"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(done.stdout) == curl(loaded, "/v1/tasks")[2]
    listed = subprocess.run(
        [sys.executable, "-m", "mesh", "service", "ls"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    rows = {line.split()[1]: line.split()[-1] for line in listed.stdout.splitlines()[1:]}
    # every service's tasks counted, over both pages of /v1/tasks (620 > 500)
    assert (rows["api"], rows["db"]) == ("207/207", "206/206")
