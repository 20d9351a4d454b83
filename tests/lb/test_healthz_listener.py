"""The `--lb-healthz` listener on loopback: what it answers, and how a hostile peer is bounded."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from lb.healthz import HealthListener
from lb.policy import Health

SERVING = {"web": True, "db": False}


def answer(name: str) -> Health:
    if name not in SERVING:
        return Health(404, {"service": name, "error": "no such service"})
    return Health(200 if SERVING[name] else 503, {"service": name, "serving": SERVING[name]})


async def ask(address: tuple[str, int], request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(*address)
    writer.write(request)
    try:
        return await asyncio.wait_for(reader.read(), 5)
    except ConnectionResetError:  # closed with our bytes unread: a reset
        return b""
    finally:
        writer.close()


@pytest.fixture
async def listener() -> AsyncIterator[HealthListener]:
    made = HealthListener(answer, "127.0.0.1", 0, max_connections=16, per_peer=4, timeout=0.5)
    await made.start()
    yield made
    await made.stop()


async def test_200_503_404_and_head(listener: HealthListener) -> None:
    where = listener.address
    ok = await ask(where, b"GET /v1/lb/healthz/web HTTP/1.1\r\nHost: x\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200 OK\r\n") and ok.endswith(b'"serving": true}\n')
    down = await ask(where, b"GET /v1/lb/healthz/db HTTP/1.0\r\n\r\n")
    assert down.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b'"serving": false' in down
    head = await ask(where, b"HEAD /v1/lb/healthz/db HTTP/1.1\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503") and head.endswith(b"\r\n\r\n")
    for path in (b"/v1/lb/healthz/nope", b"/", b"/v1/lb/healthz/", b"/v1/lb/healthz/a/b"):
        missing = await ask(where, b"GET " + path + b" HTTP/1.1\r\n\r\n")
        assert missing.startswith(b"HTTP/1.1 404"), (path, missing)
    assert (await ask(where, b"POST /v1/lb/healthz/web HTTP/1.1\r\n\r\n")).startswith(
        b"HTTP/1.1 405"
    )
    assert (await ask(where, b"garbage\r\n\r\n")).startswith(b"HTTP/1.1 400")
    assert listener.stats()["requests"] == 8
    assert listener.stats()["bad_requests"] == 1


async def test_a_hostile_peer_is_bounded(listener: HealthListener) -> None:
    where = listener.address
    # Connections that never send a head: each is cut after the timeout, and no more
    # than `per_peer` are held for one address at once.
    held = [await asyncio.open_connection(*where) for _ in range(10)]
    await asyncio.sleep(0.1)
    assert listener.stats()["open"] == 4
    assert listener.stats()["refused_busy"] == 6
    started = time.monotonic()
    for reader, writer in held:  # the ones over the limit were reset at once
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    print(f"idle connections cut after {time.monotonic() - started:.2f} s (timeout 0.5 s)")
    assert listener.stats()["timeouts"] == 4
    # A head larger than 1 KiB is refused without an answer, and counted.
    huge = await ask(where, b"GET /v1/lb/healthz/web HTTP/1.1\r\nX: " + b"a" * 4096)
    assert huge == b""
    assert listener.stats()["bad_requests"] == 1
    # Once the peer's connections are gone it is served again.
    assert (await ask(where, b"GET /v1/lb/healthz/web HTTP/1.1\r\n\r\n")).startswith(
        b"HTTP/1.1 200"
    )
    assert listener.stats()["open"] == 0
