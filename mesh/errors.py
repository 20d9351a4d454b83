"""Errors of the agent, each carrying the HTTP status and code it answers with.

The store and the API raise these; one middleware turns them into the error
shape of docs/design.md, `{"error": {"code", "message"}}` (the API's `ErrorOut`).
Nothing else is mapped to a status anywhere, so a status cannot drift from its
meaning.
"""

from __future__ import annotations


class MeshError(Exception):
    """Root of every error the API reports to its caller."""

    status: int = 400
    code: str = "bad_request"

    def __init__(
        self, message: str, *, code: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        #: headers the answer must carry (`WWW-Authenticate` on a 401, `Allow` on a 405)
        self.headers: dict[str, str] = dict(headers or {})


class BadRequest(MeshError):
    status, code = 400, "bad_request"


class Unauthorized(MeshError):
    status, code = 401, "unauthorized"


class Forbidden(MeshError):
    status, code = 403, "forbidden"


class NotFound(MeshError):
    status, code = 404, "not_found"


class MethodNotAllowed(MeshError):
    status, code = 405, "method_not_allowed"


class Conflict(MeshError):
    status, code = 409, "conflict"


class PayloadTooLarge(MeshError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(MeshError):
    status, code = 415, "unsupported_media_type"


class Invalid(MeshError):
    status, code = 422, "invalid_value"


class Unavailable(MeshError):
    """The agent cannot make a change durable (its data dir failed)."""

    status, code = 503, "unavailable"


class Internal(MeshError):
    """A bug: answered in shape (the agent keeps serving), with the details in its log."""

    status, code = 500, "internal"


class SandboxFailed(MeshError):
    """A sandboxed task's namespace or endpoints could not be made in the kernel."""

    status, code = 503, "sandbox_failed"


#: What a driver-backed network or a sandbox asks of an agent that lacks it.
PRIVILEGES_NEEDED = "needs root or CAP_NET_ADMIN and CAP_SYS_ADMIN"


def needs_privileges(what: str) -> Invalid:
    """422 `needs_privileges`: this agent cannot make kernel objects (not root)."""
    return Invalid(
        f"{what} {PRIVILEGES_NEEDED}; this agent runs without them", code="needs_privileges"
    )
