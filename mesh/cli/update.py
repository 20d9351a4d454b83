"""`mesh service update`: the pure half of its read-modify-write.

The command GETs the service, `compute_patch` turns the flags into the PATCH
body (whole new values of the fields that change), and the command sends it
with `?version=` so that an edit made in between answers 409 instead of
being overwritten. Removals apply before additions, as in `docker service
update`, so `--publish-rm 8080 --publish-add 8080:81` re-targets a port; adding
a port the service already publishes changes nothing, and a conflicting one is
left for the agent to refuse.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mesh.cli.errors import CliError, UsageError

JsonObject = dict[str, Any]
PORT_FIELDS = ("protocol", "target_port", "published_port", "publish_mode", "traffic_policy")


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceChanges:
    """What the flags of `mesh service update` ask for, already parsed."""

    network_add: tuple[str, ...] = ()
    network_rm: tuple[str, ...] = ()
    #: aliases on networks being added (`--network-add name=NET,alias=A`)
    alias_add: dict[str, tuple[str, ...]] = field(default_factory=dict)
    publish_add: tuple[JsonObject, ...] = ()
    publish_rm: tuple[tuple[int, str], ...] = ()  # (published port, protocol)
    label_add: dict[str, str] = field(default_factory=dict)
    label_rm: tuple[str, ...] = ()
    #: labels removed when present (`--locality any`), no error when absent
    label_drop: tuple[str, ...] = ()
    #: task id or name -> weight (`--weight TASK=N`), merged by the agent
    weights: dict[str, int] = field(default_factory=dict)
    endpoint_mode: str | None = None
    health_check: JsonObject | None = None
    clear_health_check: bool = False

    def is_empty(self) -> bool:
        return self == ServiceChanges()


def compute_patch(service: JsonObject, changes: ServiceChanges) -> JsonObject:
    """The PATCH body for `service` (as GET answers it); raises CliError when a removal misses."""
    if changes.is_empty():
        raise UsageError("nothing to update: give at least one change (see --help)")
    patch: JsonObject = {}
    if changes.network_add or changes.network_rm:
        patch["networks"] = _networks(service, changes)
    if changes.alias_add:
        patch["aliases"] = _aliases(service, changes, patch["networks"])
    if changes.publish_add or changes.publish_rm:
        patch["ports"] = _ports(service, changes)
    if changes.label_add or changes.label_rm or changes.label_drop:
        patch["labels"] = _labels(service, changes)
    if changes.weights:
        patch["weights"] = dict(changes.weights)
    if changes.endpoint_mode is not None:
        patch["endpoint_mode"] = changes.endpoint_mode
    if changes.clear_health_check:
        patch["health_check"] = None
    elif changes.health_check is not None:
        patch["health_check"] = changes.health_check
    return patch


def version_of(service: JsonObject) -> str | None:
    """The record's Lamport clock for `?version=`: a number, or `[clock, node]`."""
    version = service.get("version")
    if isinstance(version, list) and version:
        version = version[0]
    if isinstance(version, dict):
        version = version.get("clock")
    if isinstance(version, bool) or not isinstance(version, int | str):
        return None
    return str(version)


def _networks(service: JsonObject, changes: ServiceChanges) -> list[str]:
    name = service.get("name", "?")
    networks = list(service.get("networks") or [])
    for network in changes.network_rm:
        if network not in networks:
            raise CliError(f"service {name!r} is not attached to network {network!r}")
        networks.remove(network)
    for network in changes.network_add:
        if network in networks:
            raise CliError(f"service {name!r} is already attached to network {network!r}")
        networks.append(network)
    return networks


def _aliases(
    service: JsonObject, changes: ServiceChanges, networks: list[str]
) -> dict[str, list[str]]:
    """The service's aliases on the networks it keeps, plus those of the networks added."""
    aliases = {
        net: list(names)
        for net, names in (service.get("aliases") or {}).items()
        if net in networks and net not in changes.alias_add
    }
    for net, names in changes.alias_add.items():
        aliases[net] = list(names)
    return aliases


def _ports(service: JsonObject, changes: ServiceChanges) -> list[JsonObject]:
    ports = [{k: p[k] for k in PORT_FIELDS if k in p} for p in service.get("ports") or []]
    for published, protocol in changes.publish_rm:
        kept = [p for p in ports if not _publishes(p, published, protocol)]
        if len(kept) == len(ports):
            raise CliError(
                f"service {service.get('name', '?')!r} does not publish {published}/{protocol}"
            )
        ports = kept
    for port in changes.publish_add:
        if not any(_same_port(port, p) for p in ports):
            ports.append(dict(port))
    return ports


def _same_port(new: JsonObject, old: JsonObject) -> bool:
    """Whether `old` already is what `new` asks for (an auto published port matches any)."""
    defaults = {"protocol": "tcp", "publish_mode": "ingress", "traffic_policy": "cluster"}
    keys = [k for k in PORT_FIELDS if k in new or k in defaults]
    return all(new.get(k, defaults.get(k)) == old.get(k, defaults.get(k)) for k in keys)


def _publishes(port: JsonObject, published: int, protocol: str) -> bool:
    return bool(port.get("published_port") == published and port.get("protocol", "tcp") == protocol)


def _labels(service: JsonObject, changes: ServiceChanges) -> dict[str, str]:
    labels = dict(service.get("labels") or {})
    for key in changes.label_rm:
        if key not in labels:
            raise CliError(f"service {service.get('name', '?')!r} has no label {key!r}")
        del labels[key]
    for key in changes.label_drop:
        labels.pop(key, None)
    labels.update(changes.label_add)
    return labels
