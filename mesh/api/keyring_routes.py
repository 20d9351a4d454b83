"""Handlers of /v1/keyring: the gossip keyring, Serf's `keys -list/-install/-use/-remove`.

Every answer is the keyring as it is after the change, by fingerprint: a key
sent in a request is never echoed back. The change itself goes through the
`KeyringControl` in `ApiDeps` (the agent's gossips it to the whole cluster).
"""

from __future__ import annotations

from collections.abc import Awaitable

from aiohttp import web

from gossip.security import KeyringControl, KeyringError, parse_key
from mesh.api.app import DEPS, answer, read_model
from mesh.api.models import KeyIn, KeyringOut
from mesh.errors import Conflict, Invalid, MeshError, Unavailable

#: KeyringError codes that are conflicts with the keyring's state; the rest are bad values.
_CONFLICTS = frozenset({"primary_key"})


def _control(request: web.Request) -> KeyringControl:
    control = request.app[DEPS].keyring
    if control is None:
        raise Conflict(
            "this agent has no keyring: it runs with --insecure-gossip, gossip is not encrypted",
            code="keyring_disabled",
        )
    return control


def _answer(control: KeyringControl) -> web.Response:
    return answer(KeyringOut.model_validate(control.list()))


def _mesh_error(exc: KeyringError) -> MeshError:
    if exc.code in _CONFLICTS:
        return Conflict(str(exc), code=exc.code)
    return Invalid(str(exc), code=exc.code)


async def _key(request: web.Request) -> bytes:
    body = await read_model(request, KeyIn)  # 400/422 on the body before anything else
    try:
        return parse_key(body.key)
    except KeyringError as exc:
        raise _mesh_error(exc) from None


async def list_keys(request: web.Request) -> web.Response:
    return _answer(_control(request))


async def install_key(request: web.Request) -> web.Response:
    key = await _key(request)
    control = _control(request)
    await _change(control.install(key))
    return _answer(control)


async def use_key(request: web.Request) -> web.Response:
    key = await _key(request)
    control = _control(request)
    await _change(control.use(key))
    return _answer(control)


async def remove_key(request: web.Request) -> web.Response:
    key = await _key(request)
    control = _control(request)
    await _change(control.remove(key))
    return _answer(control)


async def _change(change: Awaitable[None]) -> None:
    """Await a control's change, mapping its refusals to the API's errors."""
    try:
        await change
    except KeyringError as exc:
        raise _mesh_error(exc) from None
    except OSError as exc:  # the keyring file could not be written: nothing changed
        raise Unavailable(f"the keyring could not be made durable: {exc}") from None
