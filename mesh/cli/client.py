"""A small JSON client for the agent's HTTP API, on urllib alone.

Errors are classified here and nowhere else: an error body becomes `ApiError`,
a failed connection `Unreachable`, so commands never see `OSError` or
`urllib.error`. Proxies from the environment are ignored: the API is local.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

from mesh.cli.errors import ApiError, CliError, Unreachable
from mesh.core import net

DEFAULT_PORT = 2377
DEFAULT_API = f"127.0.0.1:{DEFAULT_PORT}"
TIMEOUT = 30.0  # seconds; a local agent answers in milliseconds
#: a stream's reads: the agent sends a keep-alive every 15 s, so silence this long is a loss
STREAM_TIMEOUT = 45.0

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


def api_path(prefix: str, *names: str) -> str:
    """`prefix` followed by each name as one escaped path segment: `/v1/networks/a%2Fb`."""
    return "/".join([prefix, *(urllib.parse.quote(name, safe="") for name in names)])


def display_address(url: str) -> str:
    """What error messages call the agent: `HOST:PORT`."""
    return urllib.parse.urlsplit(url).netloc


class Client:
    def __init__(self, api: str, token: str | None = None, timeout: float = TIMEOUT) -> None:
        self.url = base_url(api)
        self._token = token or None
        self._timeout = timeout
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

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
        req = self._build(method, path, body, query)
        try:
            with self._opener.open(req, timeout=self._timeout) as resp:
                return _decode(resp.read())
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
