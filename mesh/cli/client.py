"""A small JSON client for the agent's HTTP API, on urllib alone.

Errors are classified here and nowhere else: an error body becomes `ApiError`,
a failed connection `Unreachable`, so commands never see `OSError` or
`urllib.error`. Proxies from the environment are ignored: the API is local.

An `https://` API is verified against `--ca-cert` (else the system's CAs),
and `--cert/--key` are presented to an agent that asks for a client
certificate (mTLS, `mesh agent --api-tls-ca`).
"""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any

from mesh.cli.errors import ApiError, CliError, Unreachable
from mesh.core import net

DEFAULT_PORT = 2377
DEFAULT_API = f"127.0.0.1:{DEFAULT_PORT}"
TIMEOUT = 30.0  # seconds; a local agent answers in milliseconds
#: a stream's reads: the agent sends a keep-alive every 15 s, so silence this long is a loss
STREAM_TIMEOUT = 45.0
#: items per request when a command reads a whole list (`mesh task ls`): the agent's
#: pages (mesh.api.paging; at most 1,000) keep each answer, and each pause, short
PAGE_SIZE = 500

JsonObject = dict[str, Any]


def base_url(api: str) -> str:
    """`HOST:PORT`, `HOST` or `http://HOST:PORT[/]` to `http://HOST:PORT` (2377 by default)."""
    text = api.strip()
    refused = CliError(f"--api {api!r} is not HOST:PORT or http://HOST:PORT")
    try:
        parts = urllib.parse.urlsplit(text if "://" in text else f"http://{text}")
        # The port as every other address of meshplane is read (mesh.core.net): "h:"
        # names no port, so it is refused rather than defaulted.
        if parts.netloc.endswith(":"):
            raise refused
        address = net.parse_host_port(parts.netloc, DEFAULT_PORT, "--api")
    except ValueError:  # urlsplit: a bad [IPv6]; net.AddressError
        raise refused from None
    if parts.scheme not in ("http", "https"):
        raise refused
    return f"{parts.scheme}://{address}{parts.path.rstrip('/')}"


@dataclass(frozen=True, slots=True)
class ClientTls:
    """How to talk HTTPS to the agent: whom to trust, and which certificate to present."""

    ca_cert: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def context(self) -> ssl.SSLContext:
        """The client context; CliError naming the file that does not load."""
        if (self.cert is None) != (self.key is None):
            raise CliError("--cert and --key go together: give both (or neither)")
        try:
            context = ssl.create_default_context(
                cafile=None if self.ca_cert is None else str(self.ca_cert)
            )
        except OSError as exc:
            raise CliError(f"--ca-cert {self.ca_cert}: cannot load: {_why(exc)}") from None
        if self.cert is not None and self.key is not None:
            try:
                context.load_cert_chain(self.cert, self.key, password=_no_password)
            except OSError as exc:
                raise CliError(
                    f"--cert {self.cert} with --key {self.key}: cannot load: {_why(exc)}"
                ) from None
        return context


def _no_password() -> bytes:
    return b""  # an encrypted key fails to load rather than prompting


def _why(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return exc.strerror or str(exc)


def read_token_file(path: Path, what: str = "--token-file") -> str:
    """The token a file holds: its one line, surrounding whitespace dropped. Errors name
    the file, never what it holds."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CliError(f"{what} {path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise CliError(f"{what} {path}: not UTF-8 text") from None
    token = text.strip()
    if not token:
        raise CliError(f"{what} {path} is empty")
    if len(token.split()) != 1 or not token.isascii() or not token.isprintable():
        raise CliError(
            f"{what} {path} must hold the token alone, in visible ASCII (not the agent's "
            "'<scope> <token>' lines)"
        )
    return token


def api_path(prefix: str, *names: str) -> str:
    """`prefix` followed by each name as one escaped path segment: `/v1/networks/a%2Fb`."""
    return "/".join([prefix, *(urllib.parse.quote(name, safe="") for name in names)])


def display_address(url: str) -> str:
    """What error messages call the agent: `HOST:PORT`."""
    return urllib.parse.urlsplit(url).netloc


class Client:
    def __init__(
        self,
        api: str,
        token: str | None = None,
        timeout: float = TIMEOUT,
        tls: ClientTls | None = None,
    ) -> None:
        self.url = base_url(api)
        self._token = token or None
        self._timeout = timeout
        handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
        if self.url.startswith("https://"):
            handlers.append(urllib.request.HTTPSHandler(context=(tls or ClientTls()).context()))
        self._opener = urllib.request.build_opener(*handlers)

    def __repr__(self) -> str:
        return f"<Client {self.url} token={'yes' if self._token else 'no'}>"

    def get(self, path: str, query: dict[str, str] | None = None) -> Any:
        return self.request("GET", path, query=query)

    def post(self, path: str, body: JsonObject) -> Any:
        return self.request("POST", path, body=body)

    def patch(self, path: str, body: JsonObject, query: dict[str, str] | None = None) -> Any:
        return self.request("PATCH", path, body=body, query=query)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def request(
        self,
        method: str,
        path: str,
        *,
        body: JsonObject | None = None,
        query: dict[str, str] | None = None,
    ) -> Any:
        """Send one request; the decoded JSON answer, or None for an empty one."""
        return self._send(self._build(method, path, body, query))[0]

    def get_all(
        self, path: str, query: dict[str, str] | None = None, page: int = PAGE_SIZE
    ) -> list[Any]:
        """Every item of a list endpoint, fetched `page` at a time: `?limit=` and then the
        `after` of each answer's `Link: <...>; rel="next"` until there is none (docs/api.md,
        "Pages"). An agent that pages nothing answers the whole list to the first request,
        with no Link, so this works with it too."""
        items: list[Any] = []
        after: str | None = None
        seen: set[str] = set()
        while True:
            asked = {**(query or {}), "limit": str(page)}
            if after is not None:
                asked["after"] = after
            body, headers = self._send(self._build("GET", path, None, asked))
            if not isinstance(body, list):
                raise CliError(f"the agent answered GET {path} with something that is not a list")
            items.extend(body)
            after = next_cursor(headers.get_all("Link") or [])
            if after is None:
                return items
            if after in seen:  # a cursor that goes round: never loop on it
                raise CliError(f"the agent's pages of {path} go round in a circle")
            seen.add(after)

    def _send(self, req: urllib.request.Request) -> tuple[Any, Message]:
        try:
            with self._opener.open(req, timeout=self._timeout) as resp:
                return _decode(resp.read()), resp.headers
        except urllib.error.HTTPError as exc:
            raise _api_error(exc) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise self._unreachable(exc) from None

    def stream(
        self, path: str, *, last_event_id: str | None = None, timeout: float = STREAM_TIMEOUT
    ) -> Iterator[str]:
        """Open a server-sent event stream now (errors as `request`'s); its lines, without
        line ends, as they come. A read failure mid-stream is `Unreachable` too."""
        req = self._build("GET", path, None, None)
        req.add_header("Accept", "text/event-stream")
        if last_event_id is not None:
            req.add_header("Last-Event-ID", last_event_id)
        try:
            resp = self._opener.open(req, timeout=timeout)
        except urllib.error.HTTPError as exc:
            raise _api_error(exc) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise self._unreachable(exc) from None
        return self._lines(resp)

    def _lines(self, resp: Any) -> Iterator[str]:
        with resp:
            try:
                for raw in resp:
                    yield raw.decode("utf-8", "replace").rstrip("\r\n")
            except (OSError, http.client.HTTPException) as exc:
                raise self._unreachable(exc) from None

    def _build(
        self, method: str, path: str, body: JsonObject | None, query: dict[str, str] | None
    ) -> urllib.request.Request:
        url = self.url + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        headers = {"Accept": "application/json", "User-Agent": "mesh-cli"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        return urllib.request.Request(url, data=data, headers=headers, method=method)

    def _unreachable(self, exc: Exception) -> Unreachable:
        reason: object = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        if isinstance(reason, OSError) and reason.strerror:
            reason = reason.strerror
        return Unreachable(
            f"cannot reach the agent at {display_address(self.url)}: {reason or type(exc).__name__}"
        )


def next_cursor(links: list[str]) -> str | None:
    """The `after` of the `rel="next"` target among Link header values (RFC 8288), if any."""
    for value in links:
        for link in value.split(","):
            target, _, params = link.partition(";")
            rels = {
                p.strip().removeprefix("rel=").strip('"')
                for p in params.split(";")
                if p.strip().startswith("rel=")
            }
            if "next" in rels and target.strip().startswith("<") and target.strip().endswith(">"):
                query = urllib.parse.urlsplit(target.strip()[1:-1]).query
                found = urllib.parse.parse_qs(query).get("after")
                if found:
                    return found[-1]
    return None


def _decode(raw: bytes) -> Any:
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except ValueError:
        raise CliError("the agent answered with something that is not JSON") from None


def _api_error(exc: urllib.error.HTTPError) -> ApiError:
    """The error body's code and message, or the HTTP status when there is none."""
    try:
        error = json.loads(exc.read())["error"]
        return ApiError(exc.code, str(error["code"]), str(error["message"]))
    except (ValueError, KeyError, TypeError, OSError, http.client.HTTPException):
        return ApiError(exc.code, f"http_{exc.code}", exc.reason or f"HTTP {exc.code}")
