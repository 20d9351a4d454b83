"""`mesh resolve`: what the embedded DNS answers a given asker, as plain data.

The query goes through the very responder (and, for other names, the
forwarder) that serves port 53, from an address on the asker's network, so
what this prints is what a task on that network gets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dnslib import QTYPE, RCODE, DNSRecord

from dns.responder import Action, Responder


class BadQuestion(ValueError):
    """A name or record type that cannot be asked."""


@dataclass(frozen=True, slots=True)
class Asker:
    source: str  # the source address the responder sees
    network: str | None


def build_query(name: str, qtype: str) -> bytes:
    if not name or len(name) > 253 or any(c.isspace() for c in name):
        raise BadQuestion(f"{name!r} is not a DNS name")
    kind = qtype.upper()
    if kind not in QTYPE.reverse or kind == "OPT":  # getattr(QTYPE, x) raises on unknowns
        raise BadQuestion(f"unknown record type {qtype!r}")
    try:
        return bytes(DNSRecord.question(name, kind).pack())
    except Exception as exc:  # dnslib: a label over 63 bytes, an empty label...
        raise BadQuestion(f"{name!r} is not a DNS name: {exc}") from None


def describe_reply(reply: bytes, *, forwarded: bool) -> dict[str, Any]:
    parsed = DNSRecord.parse(reply)

    def records(section: list[Any]) -> list[dict[str, Any]]:
        return [
            {
                "name": str(r.rname).rstrip(".") or ".",
                "type": QTYPE.get(r.rtype),
                "ttl": r.ttl,
                "data": str(r.rdata),
            }
            for r in section
            if r.rtype != QTYPE.OPT
        ]

    return {
        "rcode": RCODE.get(parsed.header.rcode),
        "forwarded": forwarded,
        "truncated": bool(parsed.header.tc),
        "answers": records(parsed.rr),
        "additional": records(parsed.ar),
    }


async def resolve(
    responder: Responder, forward: Any, asker: Asker, name: str, qtype: str
) -> dict[str, Any]:
    """Ask as `asker` would (over TCP, so nothing is truncated); `forward(query, tcp)`."""
    query = build_query(name, qtype)
    reply = responder.respond(query, asker.source, tcp=True)
    forwarded = reply is Action.FORWARD
    if forwarded:
        reply = await forward(query, True)
    if not isinstance(reply, bytes):
        raise BadQuestion("the query was dropped")
    return {
        "name": name,
        "type": qtype.upper(),
        "network": asker.network,
        "source": asker.source,
        **describe_reply(reply, forwarded=forwarded),
    }
