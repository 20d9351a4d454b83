"""The agent's composition: parts entered in order on one AsyncExitStack, undone in reverse.

The real parts are built and entered in this process (on loopback, with free
ports, the userspace load balancer); a failure is injected into one part's
start, and the parts started before it (and it) must be undone in reverse
order, the agent ending with its one-line start error and every port free
again. A clean stop, and a part failing later (`fail`, as a failed disk
does), undo every part in reverse too.
"""

from __future__ import annotations

import contextlib
import gc
import sys
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import uvloop

import mesh.agent
from mesh.agent.build import Agent
from mesh.agent.lifetime import Stage, enter, stages
from mesh.config import AgentConfig, load_config
from mesh.sandbox.privileges import missing_privileges
from tests.helpers.agent import bindable, free_ports

STAGES = [
    "state writer",
    "state",
    "health reports",
    "health checks",
    "drain reaper",
    "tombstone reaper",
    "route problems",
    "dns",
    "load balancer",
    "http routing mesh",
    # only where the agent may make namespaces (root or CAP_SYS_ADMIN + CAP_NET_ADMIN)
    *(["sandboxes"] if missing_privileges() is None else []),
    "gossip",
    "cluster",
    "api",
]


async def test_enter_undoes_what_it_entered_in_reverse_even_past_a_failing_cleanup() -> None:
    done: list[str] = []

    def stage(name: str, *, fails: bool = False, stop_fails: bool = False) -> Stage:
        async def start() -> None:
            done.append(f"start {name}")
            if fails:
                raise RuntimeError(name)

        async def stop() -> None:
            done.append(f"stop {name}")
            if stop_fails:
                raise OSError(name)

        return Stage(name, start, stop)

    with pytest.raises(RuntimeError, match="c"):
        async with AsyncExitStack() as stack:
            await enter(
                [stage("a"), stage("b", stop_fails=True), stage("c", fails=True), stage("d")], stack
            )
    # c's own stop runs too (a part that failed half-way is undone); b's failing stop
    # does not keep a from stopping.
    assert done == ["start a", "start b", "start c", "stop c", "stop b", "stop a"]


def _config(tmp_path: Path) -> tuple[AgentConfig, list[int]]:
    ports = free_ports(4)
    api, dns, gossip, http = ports
    config = load_config(
        [
            "--node-name",
            "n1",
            "--data-dir",
            str(tmp_path / "data"),
            "--api",
            f"127.0.0.1:{api}",
            "--address-pool",
            "127.64.0.0/12",
            "--dns",
            f"127.0.0.1:{dns}",
            "--dns-upstream",
            "127.0.0.1:9",
            "--advertise",
            f"127.0.0.1:{gossip}",
            "--gossip-profile",
            "local",
            "--lb",
            "userspace",
            "--publish-address",
            "127.0.0.1",
            "--http",
            f"127.0.0.1:{http}",
        ]
    )
    return config, ports


def _ports_free(ports: list[int]) -> bool:
    return all(bindable(port, "127.0.0.1") for port in ports)


def _run(
    monkeypatch: pytest.MonkeyPatch,
    config: AgentConfig,
    wrap: Callable[[Agent, Stage, list[str]], Stage],
) -> tuple[int, list[str]]:
    """Run the agent with every stage wrapped; returns its exit status and what ran."""
    done: list[str] = []

    def recorded(agent: Agent, stack: AsyncExitStack) -> list[Stage]:
        real = stages(agent, stack)
        assert [s.name for s in real] == STAGES
        return [wrap(agent, s, done) for s in real]

    monkeypatch.setattr(mesh.agent, "stages", recorded)
    # No overlays: as root the agent would make its ingress overlay (a bridge, a VXLAN
    # device, an nftables table) in the machine's own namespace at start; a unit test
    # makes no kernel object. The sandbox stage still starts and stops.
    # (the module from sys.modules: `mesh.agent.build` as an attribute is the function)
    monkeypatch.setattr(sys.modules["mesh.agent.build"], "_vtep", lambda _config: None)
    try:
        status = uvloop.run(mesh.agent.run(config))
    finally:
        gc.unfreeze()  # a started agent froze its heap: this one is pytest's
    return status, done


def _recording(
    stage: Stage, done: list[str], *, fails: bool = False, after: Callable[[], None] | None = None
) -> Stage:
    async def start() -> None:
        done.append(f"start {stage.name}")
        if fails:
            raise RuntimeError(f"injected in {stage.name}")
        await stage.start()
        if after is not None:
            after()

    async def stop() -> None:
        done.append(f"stop {stage.name}")
        await stage.stop()

    return Stage(stage.name, start, stop)


@pytest.mark.parametrize("failing", STAGES)
def test_a_failed_start_undoes_the_parts_started_before_in_reverse(
    failing: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config, ports = _config(tmp_path)
    status, done = _run(
        monkeypatch,
        config,
        lambda _agent, stage, done: _recording(stage, done, fails=stage.name == failing),
    )
    started = [line[len("start ") :] for line in done if line.startswith("start ")]
    stopped = [line[len("stop ") :] for line in done if line.startswith("stop ")]
    err = capsys.readouterr().err
    print(f"failed in {failing!r}: started {len(started)} parts, stopped {stopped}")
    assert status == 1
    assert started == STAGES[: STAGES.index(failing) + 1]
    assert stopped == started[::-1]
    assert err.splitlines()[-1] == (
        f"mesh agent: start failed: RuntimeError('injected in {failing}') (a bug: see the log)"
    )
    assert _ports_free(ports), "a listener outlived the failed start"


@pytest.mark.parametrize("how", ["stop", "fail"])
def test_a_stop_or_a_later_failure_undoes_every_part_in_reverse(
    how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, ports = _config(tmp_path)

    def wrap(agent: Agent, stage: Stage, done: list[str]) -> Stage:
        after = None
        if stage.name == "api":  # the agent is up: stop it, or make a part fail
            after = (
                agent.stopping.stop
                if how == "stop"
                else (lambda: agent.stopping.fail("the disk failed"))
            )
        return _recording(stage, done, after=after)

    status, done = _run(monkeypatch, config, wrap)
    assert status == (0 if how == "stop" else 1)
    assert done == [f"start {name}" for name in STAGES] + [
        f"stop {name}" for name in reversed(STAGES)
    ]
    assert _ports_free(ports)
    with contextlib.suppress(FileNotFoundError):
        assert not (tmp_path / "data" / "feed.sock").exists()
