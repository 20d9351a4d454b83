"""deploy/container linted by parsing (no image can be pulled here): the Containerfile's
instructions and the compose file say what the image promises."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mesh.config import load_config

REPO = Path(__file__).resolve().parents[2]
CONTAINER = REPO / "deploy" / "container"
AGENT_CAPS = ["NET_ADMIN", "NET_BIND_SERVICE"]


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


def parse_containerfile(text: str) -> list[Instruction]:
    """Instructions with their continuation lines joined; comments and blanks dropped
    (a comment line inside a continuation is dropped too, as BuildKit does)."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        pending.append(line)
        joined = " ".join(p for p in pending if p)
        keyword, _, args = joined.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        pending = []
    assert not pending, "the file ends inside a continuation"
    return instructions


def instructions() -> list[Instruction]:
    return parse_containerfile((CONTAINER / "Containerfile").read_text())


def stages(found: list[Instruction]) -> list[list[Instruction]]:
    result: list[list[Instruction]] = []
    for instruction in found:
        if instruction.keyword == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def exec_form(args: str) -> list[str]:
    value = yaml.safe_load(args)  # a JSON array is YAML too
    assert isinstance(value, list), f"not the exec form: {args}"
    return [str(v) for v in value]


def test_the_parser_joins_continuations_and_skips_comments() -> None:
    parsed = parse_containerfile("# c\nFROM a AS b\nRUN x \\\n  # note\n  && y\n\nUSER 1\n")
    assert [(i.keyword, i.args, i.line) for i in parsed] == [
        ("FROM", "a AS b", 2),
        ("RUN", "x && y", 3),
        ("USER", "1", 7),
    ]


def test_multi_stage_slim_base_wheel_built_in_the_first_stage() -> None:
    found = instructions()
    args = {i.args.split("=", 1)[0]: i.args.split("=", 1)[1] for i in found if i.keyword == "ARG"}
    built, final = stages(found)[0], stages(found)[-1]
    assert len(stages(found)) == 2
    assert re.fullmatch(r"\$\{PYTHON_IMAGE\} AS build", built[0].args)
    assert final[0].args == "${PYTHON_IMAGE}"
    assert re.search(r"python:3\.\d+-slim", args["PYTHON_IMAGE"])
    assert any(i.keyword == "RUN" and "pip wheel" in i.args for i in built)
    copies = [i.args for i in final if i.keyword == "COPY"]
    assert "--from=build /wheels /tmp/wheels" in copies
    # Stage 2 installs only the wheels it was given: nothing fetched at that point.
    install = next(i.args for i in final if i.keyword == "RUN" and "pip install" in i.args)
    assert "--no-index" in install


def test_no_add_and_every_copied_source_exists() -> None:
    found = instructions()
    assert not [i for i in found if i.keyword == "ADD"], "ADD fetches URLs and unpacks: COPY"
    for instruction in found:
        if instruction.keyword != "COPY" or instruction.args.startswith("--from"):
            continue
        *sources, _dest = shlex.split(instruction.args)
        for source in sources:
            assert (REPO / source).exists(), f"line {instruction.line}: {source} is missing"
            assert not re.match(r"^[a-z]+://", source)


def test_non_root_user_with_only_the_agents_file_capabilities() -> None:
    final = stages(instructions())[-1]
    users = [i.args for i in final if i.keyword == "USER"]
    assert users, "no USER: the image would run as root"
    uid = users[-1].split(":")[0]
    assert uid not in ("0", "root") and int(uid) >= 1000
    setcaps = [
        part.strip()
        for i in final
        if i.keyword == "RUN"
        for part in i.args.split("&&")
        if part.strip().startswith("setcap")
    ]
    assert "setcap cap_net_admin,cap_net_bind_service+ep /opt/meshplane/bin/mesh-python" in (
        setcaps
    )
    for line in setcaps:
        caps = line.split()[1].split("+")[0].split(",")
        assert set(caps) <= {"cap_net_admin", "cap_net_bind_service"}, line
    # The capabilities are on a copy: the venv's own python stays unprivileged.
    assert not any(line.endswith("/bin/python") for line in setcaps)


def test_volume_healthcheck_entrypoint() -> None:
    final = stages(instructions())[-1]
    by_keyword = {i.keyword: i.args for i in final}
    assert exec_form(by_keyword["VOLUME"]) == ["/var/lib/meshplane"]
    health = by_keyword["HEALTHCHECK"]
    assert "/v1/health" in health and "CMD" in health
    assert "mesh-python" not in health  # the probe runs without the capabilities
    entrypoint = exec_form(by_keyword["ENTRYPOINT"])
    copied = {shlex.split(i.args)[-1]: shlex.split(i.args)[0] for i in final if i.keyword == "COPY"}
    assert copied[entrypoint[0]] == "deploy/container/entrypoint.sh"
    assert "mesh-python" in (CONTAINER / "entrypoint.sh").read_text()


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((CONTAINER / "compose.yaml").read_text())
    return data


def agents(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in data["services"].items()
        if service.get("image", "").startswith("meshplane")
        and "command" in service
        and name.startswith("node")
    }


def test_compose_three_agents_locked_down_on_one_network() -> None:
    data = compose()
    nodes = agents(data)
    assert sorted(nodes) == ["node1", "node2", "node3"]
    (network,) = data["networks"]
    for name, node in nodes.items():
        assert node["read_only"] is True, name
        assert node["cap_drop"] == ["ALL"], name
        assert sorted(node["cap_add"]) == AGENT_CAPS, name
        assert list(node["networks"]) == [network], name
        assert node["volumes"] == [f"{name}-data:/var/lib/meshplane"]
        assert "MESH_JOIN_TOKEN" in node["environment"]
    for name, service in data["services"].items():
        assert "privileged" not in service, name
        assert set(service.get("cap_add", [])) <= set(AGENT_CAPS), name
        assert service.get("read_only") is True, name


def test_compose_agents_accept_their_command_and_join_by_name(tmp_path: Path) -> None:
    """Each node's command, after the image's config file as the entrypoint gives it,
    is a valid `mesh agent` command line; it advertises its own address."""
    data = compose()
    (network,) = data["networks"].values()
    subnet = network["ipam"]["config"][0]["subnet"]
    config = CONTAINER / "agent.toml"
    for name, node in agents(data).items():
        parsed = load_config(["--config", str(config), *node["command"]], env={})
        address = node["networks"]["mesh"]["ipv4_address"]
        assert parsed.advertise.host == address and address.startswith(subnet.rsplit(".", 2)[0])
        assert parsed.node_name == name
        # Docker's resolver owns 127.0.0.11:53 in a container.
        assert parsed.dns is not None and parsed.dns.host != "127.0.0.11"
        if name != "node1":
            assert [j.host for j in parsed.join] == ["node1"]


def test_compose_publishes_one_service_through_the_routing_mesh_on_every_node() -> None:
    data = compose()
    setup = " ".join(data["services"]["setup"]["command"])
    published = re.search(r"--publish (\d+):(\d+)", setup)
    assert published, setup
    port = published.group(1)
    host_ports = set()
    for node in agents(data).values():
        (mapping,) = node["ports"]
        host, container = mapping.split(":")
        assert container == port
        host_ports.add(host)
    assert len(host_ports) == 3
    web = data["services"]["web"]
    assert re.search(rf"--address {web['networks']['mesh']['ipv4_address']}\b", setup)
    assert published.group(2) in web["command"]
    assert data["services"]["setup"]["network_mode"] == "service:node1"


def test_compose_setup_commands_are_valid_mesh_commands() -> None:
    from mesh.cli.main import build_parser

    setup = " ".join(compose()["services"]["setup"]["command"])
    commands = [shlex.split(c) for c in setup.split("&&")]
    assert [c[0] for c in commands] == ["mesh", "mesh"]
    for command in commands:
        build_parser().parse_args(command[1:])  # exits 2 on a bad one
