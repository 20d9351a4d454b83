"""`Client.get_all`, which `mesh task ls`, `service ls`, `network ls` and `members` read
lists with: a page at a time by `?limit=` and the `after` of each `Link: rel="next"`,
against a real HTTP server on loopback that records what it was asked."""

from __future__ import annotations

import json
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from mesh.cli.client import Client, next_cursor
from mesh.cli.errors import CliError

ITEMS = [{"id": f"t{i:04d}"} for i in range(1234)]

Answer = Callable[[dict[str, str]], tuple[list[Any], str | None]]


def paged(query: dict[str, str]) -> tuple[list[Any], str | None]:
    """An agent that pages: the items after `after`, `limit` of them, a Link if more."""
    start = int(query.get("after", "-1")) + 1
    limit = int(query["limit"]) if "limit" in query else len(ITEMS)
    page = ITEMS[start : start + limit]
    more = start + limit < len(ITEMS)
    return page, f"{start + limit - 1}" if more else None


@pytest.fixture
def server() -> Iterator[tuple[list[dict[str, str]], Callable[[Answer], Client]]]:
    asked: list[dict[str, str]] = []
    answer: list[Answer] = [paged]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            query = dict(urllib.parse.parse_qsl(url.query))
            asked.append(query)
            items, cursor = answer[0](query)
            body = json.dumps(items).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if cursor is not None:
                following = urllib.parse.urlencode({**query, "after": cursor})
                self.send_header("Link", f'<{url.path}?{following}>; rel="next"')
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()

    def client(how: Answer) -> Client:
        answer[0] = how
        return Client(f"127.0.0.1:{httpd.server_address[1]}")

    try:
        yield asked, client
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def test_get_all_follows_the_link_a_page_at_a_time(server: Any) -> None:
    asked, client = server
    assert client(paged).get_all("/v1/tasks", {"service": "web"}, page=500) == ITEMS
    assert asked == [
        {"service": "web", "limit": "500"},
        {"service": "web", "limit": "500", "after": "499"},
        {"service": "web", "limit": "500", "after": "999"},
    ]


def test_an_agent_that_does_not_page_answers_everything_at_once(server: Any) -> None:
    asked, client = server
    assert client(lambda query: (ITEMS, None)).get_all("/v1/tasks") == ITEMS
    assert len(asked) == 1


def test_a_cursor_that_goes_round_is_an_error_not_a_loop(server: Any) -> None:
    asked, client = server
    with pytest.raises(CliError, match="circle"):
        client(lambda query: (ITEMS[:2], "7")).get_all("/v1/tasks", page=2)
    assert len(asked) == 2


def test_next_cursor_reads_rfc_8288_links() -> None:
    assert next_cursor(['</v1/tasks?limit=5&after=abc_-1>; rel="next"']) == "abc_-1"
    assert next_cursor(['</v1/x?after=a>; rel="prev", </v1/x?after=b>; rel=next']) == "b"
    assert next_cursor(['</v1/x?after=a>; rel="prev"']) is None
    assert next_cursor([]) is None
