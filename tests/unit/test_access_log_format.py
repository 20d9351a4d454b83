"""The access log's core: formats, sampling (injected RNG), the bounded queue, the writer."""

from __future__ import annotations

import itertools
import json
import re
import time
from pathlib import Path

import pytest

import lb.accesslog
from lb.accesslog import (
    AccessLog,
    AccessLogSettings,
    AccessQueue,
    Sampler,
    format_clf,
    format_json,
)
from mesh.config import ConfigError, load_config

CLF = re.compile(
    r"^(?P<client>\S+) - - \[(?P<time>\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d \+0000)\] "
    r'"(?P<request>[^"\\]*(?:\\.[^"\\]*)*)" (?P<status>\d{3}|-) (?P<bytes>\d+|-) '
    r'"(?P<referer>[^"\\]*(?:\\.[^"\\]*)*)" "(?P<agent>[^"\\]*(?:\\.[^"\\]*)*)"$'
)


def _http_entry(**extra: object) -> dict[str, object]:
    return {
        "time": 1_796_607_334.25,  # 2026-12-07T01:35:34.250Z
        "kind": "http",
        "client": "10.0.0.7",
        "method": "GET",
        "host": "web.example",
        "path": "/a/b",
        "protocol": "HTTP/1.1",
        "status": 200,
        "bytes": 1234,
        "duration_ms": 1.5,
        "service": "web",
        "task": "web.1",
        "upstream": "10.0.1.2:8080",
        "referer": "",
        "user_agent": "curl/8.0",
    } | extra


def test_json_line_has_the_fields_and_an_iso_time() -> None:
    line = format_json(_http_entry())
    assert "\n" not in line
    obj = json.loads(line)
    assert obj["time"] == "2026-12-07T01:35:34.250Z"
    for key, value in (("method", "GET"), ("host", "web.example"), ("path", "/a/b")):
        assert obj[key] == value
    assert obj["status"] == 200 and obj["bytes"] == 1234 and obj["task"] == "web.1"
    assert obj["duration_ms"] == 1.5


def test_json_line_of_odd_values_is_one_valid_line() -> None:
    odd = 'x"\\\n\r\u00e9\u2028\x00'
    line = format_json(_http_entry(user_agent=odd, duration_ms=float("inf"), extra=None))
    assert line.splitlines() == [line] and line.isascii()
    obj = json.loads(line)
    assert obj["user_agent"] == odd and obj["duration_ms"] is None and obj["extra"] is None


def test_clf_is_the_combined_log_format() -> None:
    line = format_clf(_http_entry())
    assert line == (
        '10.0.0.7 - - [07/Dec/2026:01:35:34 +0000] "GET /a/b HTTP/1.1" 200 1234 "-" "curl/8.0"'
    )
    assert CLF.match(line)


def test_clf_escapes_quotes_and_drops_control_characters() -> None:
    line = format_clf(_http_entry(user_agent='evil" \n"x\\', path='/"q'))
    match = CLF.match(line)
    assert match, line
    assert match["agent"] == 'evil\\" \\"x\\\\'
    assert "\n" not in line


def test_clf_of_an_l4_connection() -> None:
    entry = {"time": 0.0, "kind": "tcp", "client": "10.0.0.9", "service": "db", "bytes_out": 0}
    match = CLF.match(format_clf(entry))
    assert match and match["request"] == "TCP db -" and match["bytes"] == "-"


def test_sampler_takes_what_the_rng_puts_below_the_rate() -> None:
    draws = itertools.cycle([0.05, 0.5, 0.09, 0.95])
    sampler = Sampler(0.1, lambda: next(draws))
    assert [sampler.take() for _ in range(4)] == [True, False, True, False]


def test_sampler_at_the_ends_never_asks_the_rng() -> None:
    def never() -> float:
        raise AssertionError("the RNG was drawn")

    assert Sampler(1.0, never).take()
    assert not Sampler(0.0, never).take()


def test_full_queue_drops_and_counts_without_blocking() -> None:
    queue = AccessQueue(limit=3)
    assert [queue.put({"n": i, "time": 0.0}) for i in range(5)] == [True] * 3 + [False] * 2
    assert queue.dropped == 2 and queue.queued == 3
    data = queue.drain(lambda e: str(e["n"]))
    assert data == b"0\n1\n2\n"
    assert queue.put({"n": 9, "time": 0.0})  # room again once drained


def test_drain_takes_whole_lines_up_to_the_batch_size() -> None:
    queue = AccessQueue()
    for i in range(10):
        queue.put({"n": i})
    first = queue.drain(lambda e: "x" * 9, max_bytes=25)
    assert first == b"xxxxxxxxx\n" * 2 and len(queue.entries) == 8
    assert queue.drain(lambda e: "y" * 99, max_bytes=25) == b"y" * 99 + b"\n"  # one, whole


def test_settings_refuse_a_bad_rate_or_format() -> None:
    with pytest.raises(ValueError, match="between 0 and 1"):
        AccessLogSettings(rate=1.5)
    with pytest.raises(ValueError, match="json, clf"):
        AccessLogSettings(format="xml")


def test_two_writers_append_whole_lines_to_one_file(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    logs = [AccessLog(AccessLogSettings(str(path), 1.0, "json")) for _ in range(2)]
    for log in logs:
        log.start()
    for i in range(500):
        for n, log in enumerate(logs):
            if log.take():
                log.put(_http_entry(path=f"/{n}/{i}" + "p" * 200))
    for log in logs:
        log.stop()
    lines = path.read_text().splitlines()
    assert len(lines) == 1000
    paths = {json.loads(line)["path"].split("p")[0] for line in lines}
    assert len(paths) == 1000
    assert [log.counters()["access_log_written"] for log in logs] == [500, 500]


def _until(condition: object, bound: float = 5.0) -> float:
    started = time.monotonic()
    while not condition():  # type: ignore[operator]
        assert time.monotonic() - started < bound, "not within the bound"
        time.sleep(0.005)
    return time.monotonic() - started


def test_an_idle_writer_parks_and_the_next_entry_wakes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An idle process's writer stops polling (no wake-ups while nothing is logged), and an
    entry put while it is parked is still written."""
    monkeypatch.setattr(lb.accesslog, "POLL_SECONDS", 0.01)
    path = tmp_path / "access.log"
    log = AccessLog(AccessLogSettings(str(path), 1.0, "json"))
    log.start()
    try:
        _until(lambda: log.parks == 1)
        woken = log.wakeups
        time.sleep(0.3)  # 30 polls' time
        assert log.wakeups == woken, "a parked writer polled"
        log.put(_http_entry(path="/after-park"))
        took = _until(lambda: log.counters()["access_log_written"] == 1)
        print(f"entry written {took * 1000:.1f} ms after a put to a parked writer")
        _until(lambda: log.parks == 2)  # and it parks again
    finally:
        log.stop()
    assert json.loads(path.read_text())["path"] == "/after-park"


def test_rate_zero_starts_no_writer(tmp_path: Path) -> None:
    log = AccessLog(AccessLogSettings(str(tmp_path / "never.log"), 0.0))
    log.start()
    assert not log.enabled and not (tmp_path / "never.log").exists()
    log.stop()


def test_an_unwritable_destination_says_which(tmp_path: Path) -> None:
    log = AccessLog(AccessLogSettings(str(tmp_path / "missing" / "a.log"), 1.0))
    with pytest.raises(OSError, match=r"access log .*missing/a.log: No such file"):
        log.start()


def test_config_flags_and_toml(tmp_path: Path) -> None:
    cfg = load_config([])
    assert (cfg.access_log, cfg.access_log_sample, cfg.access_log_format) == ("-", 0.01, "json")
    cfg = load_config(
        ["--access-log", "/tmp/a.log", "--access-log-sample", "0.5", "--access-log-format", "clf"]
    )
    assert (cfg.access_log, cfg.access_log_sample, cfg.access_log_format) == (
        "/tmp/a.log",
        0.5,
        "clf",
    )
    toml = tmp_path / "agent.toml"
    toml.write_text('access-log = "x.log"\naccess_log_sample = 1\naccess-log-format = "clf"\n')
    cfg = load_config(["--config", str(toml)])
    assert (cfg.access_log, cfg.access_log_sample, cfg.access_log_format) == ("x.log", 1.0, "clf")
    for argv, message in (
        (["--access-log-sample", "2"], "between 0 and 1"),
        (["--access-log-sample", "nan"], "between 0 and 1"),
        (["--access-log-sample", "x"], "not a number"),
        (["--access-log-format", "xml"], "json or clf"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(argv)
