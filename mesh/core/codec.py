"""Records to plain dicts and back: the one encoding persistence and gossip share.

The dicts hold only JSON/msgpack types (str, int, float, bool, None, list,
dict with str keys). `record_from_dict` rebuilds the frozen record exactly, so
`record_from_dict(record_to_dict(r)) == r` for every record (a unit test says so).
Fields added after a record kind was first written (a network's scope, a
service's aliases, a task's sandbox) are optional on the way in: a record
written by an older agent, on disk or by gossip, loads with their defaults.
"""

from __future__ import annotations

import ipaddress
import json
import threading
from typing import Any

from mesh.core.model import (
    MAX_TASK_WEIGHT,
    Endpoint,
    Health,
    HealthCheck,
    Kind,
    Network,
    Node,
    PortConfig,
    Record,
    Sandbox,
    Service,
    Task,
    TaskState,
    Version,
    Vip,
)

Json = dict[str, Any]

#: how many record versions `record_json` keeps the text of: the versions one write
#: makes are encoded for gossip, for the disk and for each worker within that write
_JSON_KEPT = 256
_json_kept: dict[int, tuple[Record, str]] = {}  # id(record) -> (record, its JSON)
_json_lock = threading.Lock()  # the state writer's thread asks too


def record_json(record: Record) -> str:
    """`record_to_dict(record)` as compact JSON, made once per record version.

    A registration's record used to be encoded by gossip, by the state writer and by
    the feed to every worker, each on its own. Records are immutable, so the text of
    a version is kept (with the version itself, so that its `id` cannot be reused
    while kept) for the few recent ones, and every user shares it."""
    kept = _json_kept.get(id(record))
    if kept is not None and kept[0] is record:
        return kept[1]
    text = json.dumps(record_to_dict(record), separators=(",", ":"))
    with _json_lock:
        if len(_json_kept) >= _JSON_KEPT:
            del _json_kept[next(iter(_json_kept))]  # the oldest: dicts keep their order
        _json_kept[id(record)] = (record, text)
    return text


def version_to_list(version: Version) -> list[Any]:
    return [version.clock, version.node]


def record_to_dict(record: Record) -> Json:
    common: Json = {"version": version_to_list(record.version), "deleted": record.deleted}
    match record:
        case Network():
            return common | {
                "kind": Kind.NETWORK.value,
                "name": record.name,
                "id": record.id,
                "driver": record.driver,
                "subnet": record.subnet,
                "gateway": record.gateway,
                "labels": dict(record.labels),
                "created_at": record.created_at,
                "scope": record.scope,
                "node": record.node,
                "internal": record.internal,
                "attachable": record.attachable,
                "ip_range": record.ip_range,
                "aux_addresses": dict(record.aux_addresses),
                "options": dict(record.options),
                "vni": record.vni,
            }
        case Service():
            return common | {
                "kind": Kind.SERVICE.value,
                "name": record.name,
                "id": record.id,
                "networks": list(record.networks),
                "endpoint_mode": record.endpoint_mode,
                "ports": [port_to_dict(p) for p in record.ports],
                "labels": dict(record.labels),
                "vips": [{"network": v.network, "address": v.address} for v in record.vips],
                "health_check": None
                if record.health_check is None
                else check_to_dict(record.health_check),
                "created_at": record.created_at,
                "updated_at": record.updated_at,
                "aliases": {net: list(names) for net, names in record.aliases.items()},
                "weights": dict(record.weights),
            }
        case Task():
            return common | {
                "kind": Kind.TASK.value,
                "id": record.id,
                "name": record.name,
                "service": record.service,
                "slot": record.slot,
                "node": record.node,
                "address": record.address,
                "ports": {str(k): v for k, v in record.ports.items()},
                "state": record.state.value,
                "health": record.health.value,
                "health_output": record.health_output,
                "drain_until": record.drain_until,
                "created_at": record.created_at,
                "updated_at": record.updated_at,
                "sandbox": None if record.sandbox is None else sandbox_to_dict(record.sandbox),
                "weight": record.weight,
            }
        case Node():
            return common | {
                "kind": Kind.NODE.value,
                "name": record.name,
                "vtep": record.vtep,
                "addresses": dict(record.addresses),
            }
    raise TypeError(f"not a record: {record!r}")


def port_to_dict(port: PortConfig) -> Json:
    return {
        "protocol": port.protocol,
        "target_port": port.target_port,
        "published_port": port.published_port,
        "publish_mode": port.publish_mode,
        # Only when not the default: a record of a port without it stays byte for byte
        # what it was (digests, and agents of an older version that do not know the key).
        **({"traffic_policy": port.traffic_policy} if port.traffic_policy != "cluster" else {}),
    }


def check_to_dict(check: HealthCheck) -> Json:
    return {
        "type": check.type,
        "port": check.port,
        "path": check.path,
        "status_min": check.status_min,
        "status_max": check.status_max,
        "interval": check.interval,
        "timeout": check.timeout,
        "retries": check.retries,
        "start_period": check.start_period,
        "ttl": check.ttl,
    }


def sandbox_to_dict(sandbox: Sandbox) -> Json:
    return {
        "netns": sandbox.netns,
        "adopted": sandbox.adopted,
        "endpoints": [
            {"network": e.network, "address": e.address, "mac": e.mac, "interface": e.interface}
            for e in sandbox.endpoints
        ],
    }


def sandbox_from_dict(data: Json) -> Sandbox:
    return Sandbox(
        netns=str(data["netns"]),
        adopted=bool(data["adopted"]),
        endpoints=tuple(
            Endpoint(
                network=str(e["network"]),
                address=str(e["address"]),
                mac=str(e["mac"]),
                interface=str(e["interface"]),
            )
            for e in data["endpoints"]
        ),
    )


def _vni(value: Any) -> int:
    vni = int(value)
    if not 0 <= vni < 1 << 24:
        raise ValueError(f"VXLAN id {vni} is not a 24-bit number")
    return vni


def record_from_dict(data: Json) -> Record:
    """Rebuild a record; raises KeyError/ValueError/TypeError on a malformed dict."""
    version = Version(int(data["version"][0]), str(data["version"][1]))
    deleted = bool(data["deleted"])
    kind = Kind(data["kind"])
    if kind is Kind.NETWORK:
        return Network(
            name=data["name"],
            id=data["id"],
            driver=data["driver"],
            subnet=data["subnet"],
            gateway=data["gateway"],
            labels=dict(data["labels"]),
            created_at=float(data["created_at"]),
            version=version,
            deleted=deleted,
            scope="local" if data.get("scope") == "local" else "swarm",
            node=str(data.get("node", "")),
            internal=bool(data.get("internal", False)),
            attachable=bool(data.get("attachable", False)),
            ip_range=None if data.get("ip_range") is None else str(data["ip_range"]),
            aux_addresses={str(k): str(v) for k, v in data.get("aux_addresses", {}).items()},
            options={str(k): str(v) for k, v in data.get("options", {}).items()},
            vni=_vni(data.get("vni", 0)),
        )
    if kind is Kind.SERVICE:
        check = data["health_check"]
        return Service(
            name=data["name"],
            id=data["id"],
            networks=tuple(data["networks"]),
            endpoint_mode=data["endpoint_mode"],
            ports=tuple(PortConfig(**p) for p in data["ports"]),
            labels=dict(data["labels"]),
            vips=tuple(Vip(**v) for v in data["vips"]),
            health_check=None if check is None else HealthCheck(**check),
            created_at=float(data["created_at"]),
            updated_at=float(data["updated_at"]),
            version=version,
            deleted=deleted,
            aliases={
                str(net): tuple(str(a) for a in names)
                for net, names in data.get("aliases", {}).items()
            },
            weights=_weights(data.get("weights", {})),
        )
    if kind is Kind.NODE:
        addresses = data["addresses"]
        if not isinstance(addresses, dict):
            raise TypeError("a node's addresses are not an object")
        vtep = str(data["vtep"])
        # Addresses are parsed by every view that reads them: a bad one is refused here.
        for address in [*addresses.values(), *([vtep] if vtep else [])]:
            ipaddress.IPv4Address(address)
        return Node(
            name=str(data["name"]),
            vtep=vtep,
            addresses={str(k): str(v) for k, v in addresses.items()},
            version=version,
            deleted=deleted,
        )
    sandbox = data.get("sandbox")
    return Task(
        id=data["id"],
        name=data["name"],
        service=data["service"],
        slot=int(data["slot"]),
        node=data["node"],
        address=data["address"],
        ports={int(k): int(v) for k, v in data["ports"].items()},
        state=TaskState(data["state"]),
        health=Health(data["health"]),
        health_output=data["health_output"],
        drain_until=data["drain_until"],
        created_at=float(data["created_at"]),
        updated_at=float(data["updated_at"]),
        version=version,
        deleted=deleted,
        sandbox=None if sandbox is None else sandbox_from_dict(sandbox),
        weight=_weight(data.get("weight", 1)),
    )


def _weight(value: object) -> int:
    """A weight from the wire: an int in 0..MAX_TASK_WEIGHT, else the record is refused."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"weight {value!r} is not an integer")
    if not 0 <= value <= MAX_TASK_WEIGHT:
        raise ValueError(f"weight {value} is not in 0..{MAX_TASK_WEIGHT}")
    return value


def _weights(value: object) -> dict[str, int]:
    if not isinstance(value, dict):
        raise TypeError("a service's weights are not an object")
    return {str(task): _weight(weight) for task, weight in value.items()}
