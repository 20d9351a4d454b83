"""Grammars of the flag values that carry structure, each parsed into its API object.

    --publish        PUB:TARGET[/PROTO][,OPTION=VALUE]... | TARGET[/PROTO][,OPTION=VALUE]...
                     | published=PUB,target=TARGET[,protocol=tcp|udp][,mode=ingress|host]
                       [,traffic-policy=cluster|local]
    --health-check   KIND[:ARG][,KEY=VALUE]...
    --label          KEY=VALUE (or KEY, for an empty value)
    --port           TARGET=ACTUAL

A value that does not follow its grammar raises `SpecError` with a one-line
reason naming the flag; nothing here talks to the agent.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Iterable
from typing import Any

from mesh.cli.errors import SpecError
from mesh.core import net

JsonObject = dict[str, Any]

PROTOCOLS = ("tcp", "udp")
PUBLISH_MODES = ("ingress", "host")
TRAFFIC_POLICIES = ("cluster", "local")
_SHORT_PUBLISH = re.compile(
    r"^(?:(?P<published>[0-9]+):)?(?P<target>[0-9]+)(?:/(?P<protocol>\w+))?$"
)
_LONG_PUBLISH_KEYS = ("published", "target", "protocol", "mode", "traffic-policy")
#: what may follow the short form after a comma (8080:80,traffic-policy=local)
_PUBLISH_OPTION_KEYS = ("mode", "traffic-policy")

PUBLISH_HELP = "publish a port: PUB:TARGET[/tcp|/udp], TARGET[/PROTO] or the long form (below)"
PUBLISH_GRAMMAR = """\
--publish SPEC (repeatable), one of:
  PUB:TARGET[/tcp|/udp]  every node answers on PUB for the service's TARGET port
                         (8080:80, 5353:53/udp); tcp by default
  TARGET[/tcp|/udp]      the same, on a PUB the agent picks in 30000-32767
  published=PUB,target=TARGET[,protocol=tcp|udp][,mode=ingress|host]
                         the long form, as docker's; target is required, and
                         mode=host publishes only on the nodes that run a task
  ...,traffic-policy=local  (either form, e.g. 8080:80,traffic-policy=local)
                         each node sends only to its own healthy tasks, without
                         SNAT (the task sees the client's address); a node with
                         none refuses; the default, cluster, spreads over all"""


def parse_int(text: str, what: str, low: int, high: int) -> int:
    try:
        return net.parse_int(text, what, low, high)
    except net.AddressError as exc:
        raise SpecError(str(exc)) from None


def parse_port(text: str, what: str = "port") -> int:
    return parse_int(text, what, net.MIN_PORT, net.MAX_PORT)


def parse_choice(text: str, what: str, choices: Iterable[str]) -> str:
    options = tuple(choices)
    if text not in options:
        raise SpecError(f"{what} {text!r} is not one of {', '.join(options)}")
    return text


# --publish -----------------------------------------------------------------------------------


def parse_publish(text: str) -> JsonObject:
    """A `--publish` value as an API port object (`published_port` left out when auto)."""
    try:
        head, _, rest = text.partition(",")
        if "=" in head:
            return _parse_long_publish(text)
        port = _parse_short_publish(head)
        if rest:
            _publish_options(port, _key_values(rest, _PUBLISH_OPTION_KEYS))
        return port
    except SpecError as exc:
        raise SpecError(f"invalid --publish {text!r}: {exc}") from None


def _parse_short_publish(text: str) -> JsonObject:
    match = _SHORT_PUBLISH.match(text.strip())
    if match is None:
        raise SpecError("expected PUB:TARGET[/tcp|/udp], TARGET[/PROTO] or the long form")
    port: JsonObject = {"target_port": parse_port(match["target"], "target port")}
    if match["published"] is not None:
        port["published_port"] = parse_port(match["published"], "published port")
    port["protocol"] = parse_choice(match["protocol"] or "tcp", "protocol", PROTOCOLS)
    return port


def _parse_long_publish(text: str) -> JsonObject:
    fields = _key_values(text, _LONG_PUBLISH_KEYS)
    if "target" not in fields:
        raise SpecError("target= is required")
    port: JsonObject = {"target_port": parse_port(fields["target"], "target port")}
    if "published" in fields:
        port["published_port"] = parse_port(fields["published"], "published port")
    port["protocol"] = parse_choice(fields.get("protocol", "tcp"), "protocol", PROTOCOLS)
    _publish_options(port, fields)
    return port


def _publish_options(port: JsonObject, fields: dict[str, str]) -> None:
    if "mode" in fields:
        port["publish_mode"] = parse_choice(fields["mode"], "mode", PUBLISH_MODES)
    if "traffic-policy" in fields:
        port["traffic_policy"] = parse_choice(
            fields["traffic-policy"], "traffic-policy", TRAFFIC_POLICIES
        )


def parse_published_ref(text: str) -> tuple[int, str]:
    """A `--publish-rm` value, `PUB[/PROTO]`: the published port and its protocol."""
    port, _, protocol = text.strip().partition("/")
    try:
        return parse_port(port, "published port"), parse_choice(
            protocol or "tcp", "protocol", PROTOCOLS
        )
    except SpecError as exc:
        raise SpecError(f"invalid --publish-rm {text!r}: {exc}") from None


def _key_values(text: str, known: Iterable[str]) -> dict[str, str]:
    """`k=v,k=v` into a dict, refusing unknown, repeated or value-less keys."""
    allowed = tuple(known)
    fields: dict[str, str] = {}
    for item in text.split(","):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq:
            raise SpecError(f"{item!r} is not KEY=VALUE")
        if key not in allowed:
            raise SpecError(f"unknown key {key!r} (expected one of {', '.join(allowed)})")
        if key in fields:
            raise SpecError(f"{key} is given twice")
        fields[key] = value.strip()
    return fields


# durations -----------------------------------------------------------------------------------

_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?|\.[0-9]+)(ms|h|m|s)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str, what: str = "duration") -> float:
    """`500ms`, `5s`, `1m`, `1m30s`, `1h` or bare seconds (`2.5`) as seconds."""
    text = text.strip()
    if re.fullmatch(r"[0-9]+(?:\.[0-9]+)?|\.[0-9]+", text):
        return _tidy(float(text))
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise SpecError(f"{what} {text!r} is not a duration (500ms, 5s, 1m, or seconds)")
    return _tidy(sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts))


def _tidy(seconds: float) -> float:
    """Round away float noise (0.1 * 3), and keep whole seconds integral in the JSON."""
    seconds = round(seconds, 6)
    return int(seconds) if seconds.is_integer() else seconds


# --health-check ------------------------------------------------------------------------------

HEALTH_CHECK_HELP = "how tasks are checked: KIND[:ARG][,KEY=VALUE]... (below)"
HEALTH_CHECK_GRAMMAR = """\
--health-check SPEC: KIND[:ARG][,KEY=VALUE]...
  http[:PATH]   GET PATH (default /) on the target port; healthy on status 200-399
  tcp[:PORT]    connect to the target port PORT
  ttl[:TTL]     the task reports to PUT /v1/tasks/ID/health at least every TTL
  KEYs:
    port=TARGET             http, tcp: a target port (default: the service's first)
    path=/PATH              http: the same as http:/PATH
    status=N | N-M          http: the healthy statuses (default 200-399)
    interval=DURATION       http, tcp: time between checks (default 5s)
    timeout=DURATION        http, tcp: time one check may take (default 2s)
    retries=N               http, tcp: failures in a row to turn unhealthy (default 3)
    start_period=DURATION   any: failures this soon after registering don't count (0s)
    ttl=DURATION            ttl: the longest silence allowed (default 30s)
  DURATION: 500ms, 5s, 1m, 1m30s, 1h or bare seconds (2.5)
  e.g. http:/healthz,port=8080,interval=10s,status=200-299 | tcp:5432 | ttl:30s"""

CHECK_KINDS = ("http", "tcp", "ttl")
_ARG_KEY = {"http": "path", "tcp": "port", "ttl": "ttl"}
_PROBE_KEYS = ("port", "interval", "timeout", "retries", "start_period")
_KEYS_OF_KIND = {
    "http": (*_PROBE_KEYS, "path", "status"),
    "tcp": _PROBE_KEYS,
    "ttl": ("ttl", "start_period"),
}


def parse_health_check(text: str) -> JsonObject:
    """A `--health-check` value as the API's check object."""
    try:
        return _parse_health_check(text)
    except SpecError as exc:
        raise SpecError(f"invalid --health-check {text!r}: {exc}") from None


def _parse_health_check(text: str) -> JsonObject:
    head, *items = text.split(",")
    kind, colon, arg = head.strip().partition(":")
    kind = parse_choice(kind, "kind", CHECK_KINDS)
    pairs = [(_ARG_KEY[kind], arg)] if colon else []
    pairs += [_check_item(item) for item in items]
    check: JsonObject = {"type": kind}
    seen: set[str] = set()
    for key, value in pairs:
        if key not in _KEYS_OF_KIND[kind]:
            article = "an" if kind == "http" else "a"
            raise SpecError(f"{key} does not apply to {article} {kind} check")
        if key in seen:
            raise SpecError(f"{key} is given twice")
        seen.add(key)
        check.update(_CHECK_FIELDS[key](value.strip()))
    return check


def _check_item(item: str) -> tuple[str, str]:
    key, eq, value = item.partition("=")
    if not eq:
        raise SpecError(f"{item!r} is not KEY=VALUE")
    key = key.strip()
    if key not in _CHECK_FIELDS:
        raise SpecError(f"unknown key {key!r} (expected one of {', '.join(_CHECK_FIELDS)})")
    return key, value


def _path(value: str) -> JsonObject:
    if not value.startswith("/"):
        raise SpecError(f"path {value!r} does not start with /")
    return {"path": value}


def _status(value: str) -> JsonObject:
    low, dash, high = value.partition("-")
    status_min = parse_int(low, "status", 100, 599)
    status_max = parse_int(high, "status", 100, 599) if dash else status_min
    if status_min > status_max:
        raise SpecError(f"status range {value!r} is empty")
    return {"status_min": status_min, "status_max": status_max}


def _positive(key: str) -> Callable[[str], JsonObject]:
    def convert(value: str) -> JsonObject:
        seconds = parse_duration(value, key)
        if seconds <= 0:
            raise SpecError(f"{key} must be more than 0")
        return {key: seconds}

    return convert


_CHECK_FIELDS: dict[str, Callable[[str], JsonObject]] = {
    "port": lambda value: {"port": parse_port(value)},
    "path": _path,
    "status": _status,
    "interval": _positive("interval"),
    "timeout": _positive("timeout"),
    "retries": lambda value: {"retries": parse_int(value, "retries", 1, 1000)},
    "start_period": lambda value: {"start_period": parse_duration(value, "start_period")},
    "ttl": _positive("ttl"),
}


# --label, --port -----------------------------------------------------------------------------


def parse_labels(items: Iterable[str], flag: str = "--label") -> dict[str, str]:
    """`KEY=VALUE` items (a bare `KEY` has an empty value); a later key wins, as docker."""
    labels: dict[str, str] = {}
    for item in items:
        key, _, value = item.partition("=")
        if not key.strip():
            raise SpecError(f"invalid {flag} {item!r}: the key is empty")
        labels[key.strip()] = value
    return labels


def parse_port_map(items: Iterable[str]) -> dict[str, int]:
    """`--port TARGET=ACTUAL` items as the task's `ports` object (string keys)."""
    ports: dict[str, int] = {}
    for item in items:
        target, eq, actual = item.partition("=")
        try:
            if not eq:
                raise SpecError("expected TARGET=ACTUAL")
            key = str(parse_port(target, "target port"))
            if key in ports:
                raise SpecError(f"target port {key} is mapped twice")
            ports[key] = parse_port(actual, "actual port")
        except SpecError as exc:
            raise SpecError(f"invalid --port {item!r}: {exc}") from None
    return ports


# --network, --aux-address, --opt ---------------------------------------------------------------

NETWORK_GRAMMAR = (
    "--network: NET, or the long form name=NET[,alias=A]... (each alias: a DNS name the\n"
    "service also answers to, on NET only)"
)


def parse_network(text: str) -> tuple[str, tuple[str, ...]]:
    """`NET` or `name=NET,alias=A,alias=B`: the network and the service's aliases on it."""
    if "=" not in text:
        if not text.strip() or "," in text:
            raise SpecError(f"invalid --network {text!r}: expected NET or name=NET,alias=A")
        return text.strip(), ()
    name: str | None = None
    aliases: list[str] = []
    for item in text.split(","):
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not value:
            raise SpecError(f"invalid --network {text!r}: {item!r} is not KEY=VALUE")
        if key == "name":
            if name is not None:
                raise SpecError(f"invalid --network {text!r}: name is given twice")
            name = value
        elif key == "alias":
            if value not in aliases:
                aliases.append(value)
        else:
            raise SpecError(
                f"invalid --network {text!r}: unknown key {key!r} (expected name or alias)"
            )
    if name is None:
        raise SpecError(f"invalid --network {text!r}: name=NET is missing")
    return name, tuple(aliases)


def parse_networks(items: Iterable[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Repeated --network values as a body's `networks` and `aliases`."""
    networks: list[str] = []
    aliases: dict[str, list[str]] = {}
    for item in items:
        name, names = parse_network(item)
        if name in networks:
            raise SpecError(f"invalid --network {item!r}: network {name!r} is given twice")
        networks.append(name)
        if names:
            aliases[name] = list(names)
    return networks, aliases


def parse_assignments(items: Iterable[str], flag: str) -> dict[str, str]:
    """`KEY=VALUE` items that need both halves (`--aux-address`, `--opt`); a key once."""
    found: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise SpecError(f"invalid {flag} {item!r}: expected KEY=VALUE")
        if key in found:
            raise SpecError(f"invalid {flag} {item!r}: {key} is given twice")
        found[key] = value.strip()
    return found


def parse_bool(text: str, what: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "1", "on"):
        return True
    if lowered in ("false", "no", "0", "off"):
        return False
    raise SpecError(f"{what} {text!r} is not true or false")


# --weight, --locality ----------------------------------------------------------------------

#: The largest task weight (the API's `MAX_TASK_WEIGHT`).
MAX_WEIGHT = 1000
LOCALITY_LABEL = "mesh.lb.locality"
LOCALITIES = ("prefer-local", "any")


def parse_weight(text: str) -> int:
    """A task weight, 0..1000 (an argparse `type`: a bad one is a usage error)."""
    try:
        weight = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"weight {text!r} is not a whole number") from None
    if not 0 <= weight <= MAX_WEIGHT:
        raise argparse.ArgumentTypeError(f"weight {weight} is not in 0..{MAX_WEIGHT}")
    return weight


def parse_task_weights(items: list[str]) -> dict[str, int]:
    """`--weight TASK=N` items (TASK: a task's id or name) as the service's `weights` patch."""
    weights: dict[str, int] = {}
    for item in items:
        task, sep, value = item.rpartition("=")
        if not sep or not task:
            raise SpecError(f"invalid --weight {item!r}: expected TASK=N")
        try:
            weights[task] = parse_weight(value)
        except argparse.ArgumentTypeError as exc:
            raise SpecError(f"invalid --weight {item!r}: {exc}") from None
    return weights
