"""The API's TLS: HTTPS with `--api-tls-cert/--api-tls-key`, mTLS with `--api-tls-ca`.

With a CA, the handshake itself refuses a client that presents no certificate,
or one the CA did not sign: such a client never reaches the HTTP layer, so no
request of it is read. The bearer tokens apply on top, as without TLS.
"""

from __future__ import annotations

import ssl
from pathlib import Path


class TlsError(ValueError):
    """A certificate, key or CA that does not load (the message names the file)."""


def _no_password() -> bytes:
    # An encrypted key fails to load rather than prompting on the agent's terminal.
    return b""


def _why(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError):
        if exc.reason == "PEM_LIB" or "PEM lib" in str(exc):
            return "not a PEM certificate and key (or the key is encrypted)"
        return exc.reason or str(exc)
    return exc.strerror or str(exc)


def server_context(cert: Path, key: Path, ca: Path | None) -> ssl.SSLContext:
    """A server context for the API; raises TlsError naming the file that fails."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except OSError as exc:  # ssl.SSLError included
        raise TlsError(
            f"api-tls-cert {cert} with api-tls-key {key}: cannot load: {_why(exc)}"
        ) from None
    if ca is not None:
        try:
            context.load_verify_locations(cafile=ca)
        except OSError as exc:
            raise TlsError(f"api-tls-ca {ca}: cannot load: {_why(exc)}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context
