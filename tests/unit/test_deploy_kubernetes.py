"""deploy/kubernetes: every manifest valid for a fixed Kubernetes version (strict: no
unknown field), listed in the kustomization, and saying what the agent needs."""

from __future__ import annotations

import copy
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from mesh.config import load_config

REPO = Path(__file__).resolve().parents[2]
KUBE = REPO / "deploy" / "kubernetes"
#: the oldest Kubernetes still supported upstream when this was written
KUBERNETES_VERSION = "1.30.0"

MANIFESTS = sorted(p for p in KUBE.glob("*.yaml") if p.name != "kustomization.yaml")


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((KUBE / name).read_text())
    return data


def objects() -> dict[str, dict[str, Any]]:
    """kind -> the one object of that kind."""
    found = {}
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] not in found, f"{doc['kind']} twice"
            found[doc["kind"]] = doc
    return found


def test_the_kustomization_lists_every_manifest_and_no_other() -> None:
    kustomization = load("kustomization.yaml")
    assert sorted(kustomization["resources"]) == [p.name for p in MANIFESTS]
    assert kustomization["namespace"] == "meshplane"
    assert {"namespace.yaml", "daemonset.yaml", "service.yaml", "configmap.yaml"} <= set(
        kustomization["resources"]
    )


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_each_manifest_is_valid_for_the_pinned_kubernetes_strictly(path: Path) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_command_line_validator_passes_them_all() -> None:
    """What an operator (or CI) runs: `kubernetes-validate --strict -k VERSION FILE...`."""
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "kubernetes_validate",
            "--strict",
            "-k",
            KUBERNETES_VERSION,
            "--no-warn",
            *map(str, MANIFESTS),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    print(run.stdout.strip())
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("passed") == len(MANIFESTS)


def test_the_validator_rejects_an_unknown_field_and_a_wrong_type() -> None:
    """So that the test above can fail: strict mode bites on what a typo makes."""
    daemonset = load("daemonset.yaml")
    typo = copy.deepcopy(daemonset)
    typo["spec"]["template"]["spec"]["hostNetwrok"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, KUBERNETES_VERSION, strict=True)
    wrong = copy.deepcopy(daemonset)
    wrong["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "gossip"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong, KUBERNETES_VERSION, strict=True)


def agent_container(daemonset: dict[str, Any]) -> dict[str, Any]:
    (container,) = [c for c in daemonset["spec"]["template"]["spec"]["containers"]]
    return container


def test_the_daemonset_runs_on_the_host_network_with_only_the_listed_capabilities() -> None:
    daemonset = objects()["DaemonSet"]
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    container = agent_container(daemonset)
    security = container["securityContext"]
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_BIND_SERVICE"]}
    assert security["readOnlyRootFilesystem"] is True
    for init in pod["initContainers"]:
        assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["data"]["hostPath"]["path"] == mounts["data"] == "/var/lib/meshplane"
    assert volumes["config"]["configMap"]["name"] == objects()["ConfigMap"]["metadata"]["name"]


def test_probes_ask_v1_health_on_the_api_the_config_binds() -> None:
    container = agent_container(objects()["DaemonSet"])
    config = tomllib.loads(objects()["ConfigMap"]["data"]["agent.toml"])
    host, port = config["api"].rsplit(":", 1)
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        get = container[probe]["httpGet"]
        assert (get["host"], get["port"], get["path"]) == (host, int(port), "/v1/health")


def test_the_join_token_comes_from_a_secret() -> None:
    env = {e["name"]: e for e in agent_container(objects()["DaemonSet"])["env"]}
    ref = env["MESH_JOIN_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "meshplane-join", "key": "token"}
    assert "Secret" not in objects()  # created by the operator, never committed


def test_the_join_target_is_the_headless_services_dns_name(tmp_path: Path) -> None:
    found = objects()
    service, config_map = found["Service"], found["ConfigMap"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == found["DaemonSet"]["spec"]["selector"]["matchLabels"]
    # The port named "mesh" over TCP is what makes the SRV record _mesh._tcp.<name>.
    named = {(p["name"], p["protocol"]): p["port"] for p in service["spec"]["ports"]}
    assert named[("mesh", "TCP")] == 7946
    name = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
    # The agent itself accepts the ConfigMap's file, with the DaemonSet's flags.
    (tmp_path / "agent.toml").write_text(config_map["data"]["agent.toml"])
    args = [
        a.replace("$(NODE_NAME)", "node-a").replace("$(NODE_IP)", "192.0.2.7")
        for a in agent_container(found["DaemonSet"])["args"]
    ]
    args = [a.replace("/etc/meshplane/agent.toml", str(tmp_path / "agent.toml")) for a in args]
    agent = load_config(args, env={})
    assert [str(j) for j in agent.join] == [f"{name}:7946"]
    assert str(agent.advertise) == "192.0.2.7:7946"
    assert agent.node_name == "node-a"
    assert str(agent.data_dir) == "/var/lib/meshplane"
