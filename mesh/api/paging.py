"""Pages and streams of the list endpoints (`?limit=N&after=CURSOR`).

A list answers a bare JSON array, as it always has; `?limit=N` (1 to `MAX_LIMIT`)
makes it the first N items in the list's stable order, and when more follow, a
`Link: <...&after=CURSOR>; rel="next"` header gives the next page (RFC 8288, as
GitHub's API does); `after=CURSOR` continues from there. The cursor is opaque
(base64url of the last item's sort key), so a page goes on from where the last one
ended whatever was added or removed before it. A bad `limit` or cursor answers 422.

Without a limit a list is the whole list, as before; past `CHUNK` items it is sent
in chunks (`Transfer-Encoding: chunked`), each serialized from the records of that
chunk only, so a 10,000-task answer never holds 10,000 dicts at once and yields the
event loop between chunks (a registration is not held up behind a long list).
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel

from mesh.api.app import answer_list, list_adapter
from mesh.errors import Invalid

#: The largest page a client may ask for.
MAX_LIMIT = 1000
#: Items serialized at a time in a streamed (unpaged) list.
CHUNK = 500
#: Longest cursor read: a sort key is a name, a slot and an id.
MAX_CURSOR = 1024

R = TypeVar("R")
Json = dict[str, Any]


def limit_of(request: web.Request) -> int | None:
    """`?limit=`: None when absent; 422 unless an integer in 1..MAX_LIMIT."""
    text = request.query.get("limit")
    if text is None:
        return None
    if not (text.isascii() and text.isdigit()) or len(text) > 9 or not 1 <= int(text) <= MAX_LIMIT:
        raise Invalid(
            f"limit {text!r} is not an integer from 1 to {MAX_LIMIT}", code="invalid_limit"
        )
    return int(text)


def encode_cursor(key: Sequence[str | int]) -> str:
    raw = json.dumps(list(key), separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def after_of(request: web.Request, shape: Sequence[type]) -> tuple[Any, ...] | None:
    """`?after=`: the sort key it holds, of the types of `shape`; 422 when it is not one."""
    text = request.query.get("after")
    if text is None:
        return None
    try:
        if len(text) > MAX_CURSOR or not text.isascii():
            raise ValueError
        key = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        if not isinstance(key, list) or len(key) != len(shape):
            raise ValueError
        if not all(type(part) is kind for part, kind in zip(key, shape, strict=True)):
            raise ValueError
    except (ValueError, binascii.Error):
        raise Invalid(
            "after is not a cursor of this list (take it from the Link header of the "
            "previous page)",
            code="invalid_cursor",
        ) from None
    return tuple(key)


async def answer_rows(
    request: web.Request,
    model: type[BaseModel],
    rows: Iterable[R],
    fields: Callable[[R], Json],
    key: Callable[[R], Sequence[str | int]],
    limit: int | None,
) -> web.StreamResponse:
    """The list: one page of `limit` rows with a Link to the next, or, without a limit,
    every row, streamed in chunks when there are many. `rows` are in the list's order,
    from just after the cursor; they are read before the first await, so the caller may
    give a view of the store (which must not be iterated across a change)."""
    if limit is not None:
        page = list(itertools.islice(rows, limit + 1))
        response = answer_list(model, [fields(row) for row in page[:limit]])
        if len(page) > limit:
            cursor = encode_cursor(key(page[limit - 1]))
            following = request.rel_url.update_query(after=cursor)
            response.headers["Link"] = f'<{following}>; rel="next"'
        return response
    snapshot = list(rows)  # the records (immutable), not their dicts
    if len(snapshot) <= CHUNK or request.method == "HEAD":
        return answer_list(model, [fields(row) for row in snapshot])
    stream = web.StreamResponse(headers={"Content-Type": "application/json; charset=utf-8"})
    await stream.prepare(request)
    adapter = list_adapter(model)
    for start in range(0, len(snapshot), CHUNK):
        chunk = [fields(row) for row in snapshot[start : start + CHUNK]]
        body = adapter.dump_json(adapter.validate_python(chunk), exclude_unset=True)
        # each chunk is an array: its items go on the one array of the answer
        await stream.write((b"[" if start == 0 else b",") + body[1:-1])
    await stream.write(b"]")
    await stream.write_eof()
    return stream
