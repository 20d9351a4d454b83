"""A real meshplane cluster on one machine, in network namespaces (root only).

    deploy/netns-cluster up 3            # nodes n1..n3, a client namespace, all joined
    deploy/netns-cluster task 1 web 8001 # a real HTTP server in n1, registered as a task of web
    deploy/netns-cluster exec 2 mesh service ls
    deploy/netns-cluster status
    deploy/netns-cluster down            # removes everything `up` made, even after a crash

Layout (every object lives inside namespaces named `<name>-*`, so the host's
own network is never touched and `down` can find what a killed run left):

- `<name>-u`: the underlay, one bridge `br0` at the subnet's first address;
- `<name>-nI`: node I at the subnet's address 10+I, on the bridge through a
  veth (`eth0` inside), running one `mesh agent` with its own data dir, its API
  on the namespace's own 127.0.0.1:2377, its DNS on 127.0.0.11:53 (the
  namespace's resolv.conf points there, so tasks use it), the HRM on :80 and
  gossip on :7946; every agent is given every other node to `--join`, and the
  cluster's join token (`--token-file`, made by `up`: gossip is encrypted, as
  by default; an `--agent-arg --insecure-gossip` or `--keyring` replaces it);
- `<name>-c`: a client outside the cluster at the subnet's last address.

`up --user UID[:GID]` runs every agent as that user with only the capabilities
of deploy/meshplane.service (CAP_NET_ADMIN, CAP_NET_BIND_SERVICE; `--caps` to
change them), through util-linux `setpriv`, the way systemd's `User=` and
`AmbientCapabilities=` start it; its data dir is made and owned by that user.

State (pids, addresses, logs, data dirs) is kept in /run/meshplane-dev/<name>/.
Only the standard library is used: the script runs before anything is built.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import contextlib
import ctypes
import hashlib
import ipaddress
import json
import os
import re
import shutil
import signal
import site
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[1]
STATE_ROOT = Path("/run/meshplane-dev")
NETNS_RUN = Path("/run/netns")
NETNS_ETC = Path("/etc/netns")
CLONE_NEWNET = 0x40000000
API = "127.0.0.1:2377"
GOSSIP_PORT = 7946
#: Seconds `task` waits for a service made on another node to be gossiped to this one.
SERVICE_WAIT = 10.0
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9]{0,7}$")

#: A task: a threaded HTTP server answering every GET with "<ident>\n" (and TCP checks).
TASK_SERVER = """
import http.server, sys
ident = sys.argv[3].encode() + b"\\n"
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(ident)))
        self.end_headers()
        self.wfile.write(ident)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer.allow_reuse_address = True
http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), Handler).serve_forever()
"""


class ClusterError(Exception):
    """Something the operator must fix; printed as one line."""


def run(
    argv: Sequence[str], *, check: bool = True, timeout: float = 30.0, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )
    if check and done.returncode != 0:
        raise ClusterError(f"{' '.join(argv)}: {done.stderr.strip() or done.stdout.strip()}")
    return done


class Layout:
    """Names and addresses of one cluster, derived from its name, size and subnet."""

    def __init__(self, name: str, nodes: int, subnet: str) -> None:
        if not NAME_PATTERN.match(name):
            raise ClusterError(
                f"name {name!r}: 1-8 lower-case letters or digits, starting with a letter"
            )
        self.name = name
        self.nodes = nodes
        self.network = ipaddress.IPv4Network(subnet)
        if self.network.num_addresses < nodes + 16:
            raise ClusterError(f"subnet {subnet} is too small for {nodes} nodes")
        self.state_dir = STATE_ROOT / name

    @property
    def underlay(self) -> str:
        return f"{self.name}-u"

    @property
    def client(self) -> str:
        return f"{self.name}-c"

    def node_ns(self, index: int) -> str:
        return f"{self.name}-n{index}"

    def node_address(self, index: int) -> str:
        return str(self.network.network_address + 10 + index)

    @property
    def bridge_address(self) -> str:
        return str(self.network.network_address + 1)

    @property
    def client_address(self) -> str:
        return str(self.network.broadcast_address - 1)

    def cidr(self, address: str) -> str:
        return f"{address}/{self.network.prefixlen}"


#: the capabilities deploy/meshplane.service gives the agent (no CAP_SYS_ADMIN: no sandboxes)
UNIT_CAPS = ("net_admin", "net_bind_service")
#: a Python every user may run, where root's own interpreter (e.g. under /root) is private
SYSTEM_PYTHON = "/usr/bin/python3"


@dataclass(frozen=True)
class RunAs:
    """Agents run as this user, with only these capabilities (`setpriv` names)."""

    uid: int
    gid: int
    caps: tuple[str, ...] = UNIT_CAPS

    @classmethod
    def parse(cls, user: str, caps: str | None) -> RunAs:
        uid, _, gid = user.partition(":")
        try:
            chosen = UNIT_CAPS if caps is None else tuple(c for c in caps.split(",") if c)
            return cls(int(uid), int(gid or uid), chosen)
        except ValueError:
            raise ClusterError(f"--user {user!r}: UID[:GID], numbers") from None

    def prefix(self) -> list[str]:
        """`setpriv` as systemd's User=, AmbientCapabilities=, CapabilityBoundingSet= and
        NoNewPrivileges= start the agent: the capabilities are ambient, so `nft`, `ip`
        and the worker processes it runs inherit them; nothing else can be gained."""
        caps = ",".join(["-all", *(f"+{c}" for c in self.caps)])
        return [
            "setpriv",
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            "--clear-groups",
            f"--inh-caps={caps}",
            f"--ambient-caps={caps}",
            f"--bounding-set={caps}",
            "--no-new-privs",
            "--",
        ]

    def python(self) -> list[str]:
        """How this user runs the agent: this interpreter when the user may run it, else
        the system's (the same minor version) with this interpreter's packages."""
        path = ":".join([str(REPO), *site.getsitepackages()])
        candidates = [
            ["env", f"PYTHONPATH={REPO}", sys.executable],
            ["env", f"PYTHONPATH={path}", "PYTHONDONTWRITEBYTECODE=1", SYSTEM_PYTHON],
        ]
        for python in candidates:
            # Run as the agent will be (through `env`: setpriv's own exec may succeed
            # where the user's would not).
            probe = [*self.prefix(), *python, "-c", "import aiohttp, uvloop, mesh"]
            if run(probe, check=False, cwd="/").returncode == 0:
                return python
        raise ClusterError(f"uid {self.uid} can run neither {sys.executable} nor {SYSTEM_PYTHON}")


def namespaces_of(name: str) -> list[str]:
    """Every namespace a cluster of this name made, whatever state survived."""
    pattern = re.compile(rf"^{re.escape(name)}-(u|c|n\d+)$")
    if not NETNS_RUN.is_dir():
        return []
    return sorted(p.name for p in NETNS_RUN.iterdir() if pattern.match(p.name))


def in_netns(ns: str, fn: Callable[[], T]) -> T:
    """Run `fn` on a thread that has joined namespace `ns` (setns affects one thread)."""

    def enter() -> None:
        fd = os.open(NETNS_RUN / ns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
        finally:
            os.close(fd)

    with concurrent.futures.ThreadPoolExecutor(1, initializer=enter) as pool:
        return pool.submit(fn).result()


def api_get(ns: str, path: str, timeout: float = 2.0) -> Any:
    def get() -> Any:
        with urllib.request.urlopen(f"http://{API}{path}", timeout=timeout) as resp:
            return json.loads(resp.read())

    return in_netns(ns, get)


# -- up ---------------------------------------------------------------------------


def up(
    layout: Layout,
    *,
    lb: str,
    profile: str,
    dns_upstream: str,
    extra: Sequence[str],
    timeout: float,
    run_as: RunAs | None = None,
) -> dict[str, Any]:
    if os.geteuid() != 0:
        raise ClusterError("network namespaces need root")
    if run_as is not None and shutil.which("setpriv") is None:
        raise ClusterError("--user needs setpriv (util-linux)")
    down(layout.name, quiet=True)  # whatever a crashed or killed run left behind
    layout.state_dir.mkdir(parents=True)
    _write_join_token(layout, run_as)
    state: dict[str, Any] = {
        "name": layout.name,
        "subnet": str(layout.network),
        "nodes": [],
        "client": layout.client,
        "client_address": layout.client_address,
        "tasks": [],
    }
    if run_as is not None:
        state["user"] = [run_as.uid, run_as.gid, list(run_as.caps)]
    try:
        _make_underlay(layout)
        _attach(layout, layout.client, layout.client_address, "c")
        for index in range(1, layout.nodes + 1):
            ns = layout.node_ns(index)
            _attach(layout, ns, layout.node_address(index), f"n{index}")
            resolv = NETNS_ETC / ns / "resolv.conf"
            resolv.parent.mkdir(parents=True, exist_ok=True)
            resolv.write_text("nameserver 127.0.0.11\noptions timeout:2 attempts:2\n")
        for index in range(1, layout.nodes + 1):
            state["nodes"].append(
                _start_agent(layout, index, lb, profile, dns_upstream, extra, run_as)
            )
        _save(layout, state)
        _wait_converged(layout, timeout)
    except BaseException:
        _save(layout, state)
        raise
    return state


GOSSIP_SECURITY_FLAGS = ("--keyring", "--token", "--token-file", "--insecure-gossip")


def join_token(key: bytes, label: str = "") -> str:
    """A `mesh1.` join token (the format of gossip/join_token.py, written here with the
    standard library only: this script runs before anything is built)."""
    raw_label = label.encode()
    body = bytes([1, len(key)]) + key + bytes([len(raw_label)]) + raw_label
    body += hashlib.sha256(body).digest()[:4]
    return "mesh1." + base64.urlsafe_b64encode(body).decode().rstrip("=")


def _write_join_token(layout: Layout, run_as: RunAs | None = None) -> None:
    """The cluster's join token, a new key, readable by the agents' user only (root, or
    `--user`'s: a service user's agents read it, as the unit's would read its token file)."""
    path = layout.state_dir / "join-token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(join_token(os.urandom(32)) + "\n")
        if run_as is not None:
            os.fchown(out.fileno(), run_as.uid, run_as.gid)


def _make_underlay(layout: Layout) -> None:
    run(["ip", "netns", "add", layout.underlay])
    run(["ip", "-n", layout.underlay, "link", "set", "lo", "up"])
    run(["ip", "-n", layout.underlay, "link", "add", "br0", "type", "bridge"])
    run(
        [
            "ip",
            "-n",
            layout.underlay,
            "address",
            "add",
            layout.cidr(layout.bridge_address),
            "dev",
            "br0",
        ]
    )
    run(["ip", "-n", layout.underlay, "link", "set", "br0", "up"])


def _attach(layout: Layout, ns: str, address: str, port_name: str) -> None:
    """Namespace `ns` with `eth0` at `address`, its peer `port_name` on the bridge."""
    run(["ip", "netns", "add", ns])
    run(["ip", "-n", ns, "link", "set", "lo", "up"])
    # Both ends are created straight in their namespaces: nothing appears on the host.
    run(
        [
            "ip",
            "-n",
            ns,
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            port_name,
            "netns",
            layout.underlay,
        ]
    )
    run(["ip", "-n", ns, "address", "add", layout.cidr(address), "dev", "eth0"])
    run(["ip", "-n", ns, "link", "set", "eth0", "up"])
    run(["ip", "-n", ns, "route", "add", "default", "via", layout.bridge_address])
    run(["ip", "-n", layout.underlay, "link", "set", port_name, "master", "br0"])
    run(["ip", "-n", layout.underlay, "link", "set", port_name, "up"])


def agent_argv(
    layout: Layout,
    index: int,
    lb: str,
    profile: str,
    dns_upstream: str,
    extra: Sequence[str],
    python: Sequence[str] = (sys.executable,),
) -> list[str]:
    joins: list[str] = []
    for other in range(1, layout.nodes + 1):
        if other != index:
            joins += ["--join", f"{layout.node_address(other)}:{GOSSIP_PORT}"]
    chosen = any(flag in extra for flag in GOSSIP_SECURITY_FLAGS)
    security = [] if chosen else ["--token-file", str(layout.state_dir / "join-token")]
    return [
        *python,
        "-m",
        "mesh",
        "agent",
        "--node-name",
        f"n{index}",
        "--advertise",
        f"{layout.node_address(index)}:{GOSSIP_PORT}",
        *joins,
        "--data-dir",
        str(layout.state_dir / f"n{index}"),
        "--api",
        API,
        "--lb",
        lb,
        "--gossip-profile",
        profile,
        "--dns-upstream",
        dns_upstream,
        *security,
        *extra,
    ]


def _start_agent(
    layout: Layout,
    index: int,
    lb: str,
    profile: str,
    dns_upstream: str,
    extra: Sequence[str],
    run_as: RunAs | None,
) -> dict[str, Any]:
    ns = layout.node_ns(index)
    if run_as is None:
        argv = agent_argv(layout, index, lb, profile, dns_upstream, extra)
    else:
        # The data dir is the user's, as systemd's StateDirectory= makes it.
        data_dir = layout.state_dir / f"n{index}"
        data_dir.mkdir(mode=0o700, exist_ok=True)
        os.chown(data_dir, run_as.uid, run_as.gid)
        python = [*run_as.prefix(), *run_as.python()]
        argv = agent_argv(layout, index, lb, profile, dns_upstream, extra, python)
    log = layout.state_dir / f"n{index}.log"
    proc = _spawn_agent(ns, argv, log)
    return {
        "index": index,
        "ns": ns,
        "address": layout.node_address(index),
        "pid": proc.pid,
        "argv": argv,
        "log": str(log),
    }


def _spawn_agent(ns: str, argv: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        # Its own session: the agent outlives this command; `ip netns exec` execs it,
        # so the pid recorded is the agent's.
        return subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
            cwd=REPO,
            start_new_session=True,
        )


def _wait_converged(layout: Layout, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = list(range(1, layout.nodes + 1))
    last = ""
    while pending and time.monotonic() < deadline:
        for index in list(pending):
            try:
                members = api_get(layout.node_ns(index), "/v1/members")
            except (OSError, urllib.error.URLError, ValueError) as exc:
                last = f"n{index}: {exc}"
                continue
            alive = sum(1 for m in members if m.get("status") == "alive")
            if alive == layout.nodes:
                pending.remove(index)
            else:
                last = f"n{index} sees {alive} of {layout.nodes} alive"
        time.sleep(0.1)
    if pending:
        raise ClusterError(
            f"cluster did not converge in {timeout:g}s ({last}); logs in {layout.state_dir}"
        )


def stop_agent(
    state: dict[str, Any], index: int, sig: int = signal.SIGTERM, timeout: float = 15.0
) -> None:
    """Stop node `index`'s agent (SIGKILL: a crash) and wait until it is gone."""
    pid = _node(state, index)["pid"]
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            raise ClusterError(f"n{index} (pid {pid}) did not stop in {timeout:g}s")
        time.sleep(0.02)


def start_agent(state: dict[str, Any], index: int, timeout: float = 30.0) -> None:
    """Start node `index`'s agent again, as it was started, and wait for its API."""
    node = _node(state, index)
    if _alive(node["pid"]):
        raise ClusterError(f"n{index} is running (pid {node['pid']})")
    proc = _spawn_agent(node["ns"], node["argv"], Path(node["log"]))
    for entry in state["nodes"]:
        if entry["index"] == index:
            entry["pid"] = proc.pid
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ClusterError(f"n{index} exited with {proc.returncode}: see {node['log']}")
        with contextlib.suppress(OSError, urllib.error.URLError, ValueError):
            api_get(node["ns"], "/v1/health")
            return
        time.sleep(0.05)
    raise ClusterError(f"n{index} did not answer in {timeout:g}s: see {node['log']}")


# -- tasks and commands inside ----------------------------------------------------


def add_task(
    state: dict[str, Any], node: int, service: str, port: int, target: int | None
) -> dict[str, Any]:
    entry = _node(state, node)
    ident = f"n{node}:{port}"
    proc = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            entry["ns"],
            sys.executable,
            "-c",
            TASK_SERVER,
            entry["address"],
            str(port),
            ident,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    _wait_listening(entry["ns"], entry["address"], port, proc)
    mapping = [] if target is None else ["--port", f"{target}={port}"]
    # A service just made on another node reaches this one by gossip: give it a moment.
    deadline = time.monotonic() + SERVICE_WAIT
    while True:
        done = run(
            [
                "ip",
                "netns",
                "exec",
                entry["ns"],
                sys.executable,
                "-m",
                "mesh",
                "--json",
                "task",
                "add",
                service,
                "--address",
                entry["address"],
                *mapping,
            ],
            check=False,
            env=dict(os.environ, PYTHONPATH=str(REPO), MESH_API=API),
        )
        if done.returncode == 0 or "not_found" not in done.stderr or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if done.returncode != 0:
        _kill([proc.pid])
        raise ClusterError(done.stderr.strip() or "mesh task add failed")
    task = json.loads(done.stdout)
    record = {
        "node": node,
        "service": service,
        "port": port,
        "pid": proc.pid,
        "id": task["id"],
        "name": task["name"],
        "address": entry["address"],
    }
    state["tasks"].append(record)
    return record


def _wait_listening(ns: str, address: str, port: int, proc: subprocess.Popen[Any]) -> None:
    def probe() -> bool:
        with socket.socket() as sock:
            sock.settimeout(0.5)
            return sock.connect_ex((address, port)) == 0

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ClusterError(f"task server on {address}:{port} exited ({proc.returncode})")
        if in_netns(ns, probe):
            return
        time.sleep(0.05)
    _kill([proc.pid])
    raise ClusterError(f"task server on {address}:{port} did not listen")


def _node(state: dict[str, Any], index: int) -> dict[str, Any]:
    for node in state["nodes"]:
        if node["index"] == index:
            return dict(node)
    raise ClusterError(f"no node {index}: the cluster has n1..n{len(state['nodes'])}")


def exec_in(ns: str, argv: Sequence[str]) -> int:
    env = dict(os.environ, PYTHONPATH=str(REPO), MESH_API=API)
    if argv and argv[0] == "mesh":
        argv = [sys.executable, "-m", "mesh", *argv[1:]]
    return subprocess.call(["ip", "netns", "exec", ns, *argv], env=env)


# -- status and down --------------------------------------------------------------


def status(name: str) -> dict[str, Any]:
    state = load(name)
    nodes = []
    for node in state["nodes"]:
        info: dict[str, Any] = {
            "node": f"n{node['index']}",
            "address": node["address"],
            "pid": node["pid"],
            "running": _alive(node["pid"]),
        }
        try:
            members = api_get(node["ns"], "/v1/members")
            info["members_alive"] = sum(1 for m in members if m.get("status") == "alive")
        except (OSError, urllib.error.URLError, ValueError) as exc:
            info["members_alive"] = None
            info["error"] = str(exc)
        nodes.append(info)
    return {
        "name": name,
        "subnet": state["subnet"],
        "client": state["client_address"],
        "nodes": nodes,
        "tasks": state["tasks"],
    }


def down(name: str, *, quiet: bool = False) -> list[str]:
    """Remove every process, namespace and file of cluster `name`; returns what went."""
    removed: list[str] = []
    state_dir = STATE_ROOT / name
    pids: list[int] = []
    with contextlib.suppress(ClusterError):
        state = load(name)
        pids += [n["pid"] for n in state["nodes"]] + [t["pid"] for t in state["tasks"]]
    namespaces = namespaces_of(name)
    for ns in namespaces:
        listed = run(["ip", "netns", "pids", ns], check=False).stdout.split()
        pids += [int(p) for p in listed if p.isdigit()]
    killed = _kill(sorted(set(pids)))
    removed += [f"process {pid}" for pid in killed]
    for ns in namespaces:
        # Deleting the namespace takes its veths, bridge and nftables tables with it.
        run(["ip", "netns", "delete", ns], check=False)
        shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
        removed.append(f"namespace {ns}")
    if state_dir.exists():
        shutil.rmtree(state_dir, ignore_errors=True)
        removed.append(f"state {state_dir}")
    if not quiet:
        for line in removed:
            print(f"removed {line}")
    return removed


def _kill(pids: Sequence[int], grace: float = 5.0) -> list[int]:
    """TERM (an agent leaves the cluster cleanly), then KILL what is still there."""
    own = os.getpid()
    live = [p for p in pids if p != own and _alive(p)]
    for pid in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    waiting = list(live)
    while waiting and time.monotonic() < deadline:
        waiting = [p for p in waiting if _alive(p)]
        time.sleep(0.05)
    for pid in waiting:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return live


def _alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _save(layout: Layout, state: dict[str, Any]) -> None:
    path = layout.state_dir / "state.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(path)


def load(name: str) -> dict[str, Any]:
    path = STATE_ROOT / name / "state.json"
    try:
        state: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ClusterError(f"no cluster {name!r} is up (no {path})") from exc
    return state


# -- command line -----------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="netns-cluster",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top.add_argument(
        "--name", default="mpc", help="cluster name, the namespaces' prefix (default mpc)"
    )
    commands = top.add_subparsers(dest="command", required=True)
    make = commands.add_parser("up", help="create N nodes and a client, start and join agents")
    make.add_argument("nodes", type=int)
    make.add_argument(
        "--subnet",
        default="10.77.0.0/24",
        help="the underlay, inside the namespaces only (default 10.77.0.0/24)",
    )
    make.add_argument("--lb", default="auto", choices=["auto", "ipvs", "nftables", "userspace"])
    make.add_argument(
        "--profile",
        default="lan",
        choices=["lan", "wan", "local"],
        help="gossip profile (default lan)",
    )
    make.add_argument(
        "--dns-upstream",
        default="127.0.0.1:9",
        help="the agents' upstream resolver (default: none, port 9 of loopback)",
    )
    make.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds to wait for every node to see every other alive",
    )
    make.add_argument(
        "--user",
        metavar="UID[:GID]",
        help="run the agents as this user with only the unit's capabilities (setpriv)",
    )
    make.add_argument(
        "--caps",
        metavar="CAP,...",
        help=f"the capabilities of --user, setpriv names (default {','.join(UNIT_CAPS)})",
    )
    make.add_argument(
        "--agent-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more argument for every agent (repeat)",
    )
    commands.add_parser("down", help="stop and remove everything the cluster made")
    show = commands.add_parser("status", help="nodes, agents and what each sees")
    show.add_argument("--json", action="store_true")
    task = commands.add_parser("task", help="start a real HTTP server in a node, as a task")
    task.add_argument("node", type=int)
    task.add_argument("service")
    task.add_argument("port", type=int, help="the port it listens on")
    task.add_argument("--target", type=int, help="the service target port it serves")
    halt = commands.add_parser("stop", help="stop one node's agent")
    halt.add_argument("node", type=int)
    halt.add_argument("--kill", action="store_true", help="SIGKILL, as a crash")
    resume = commands.add_parser("start", help="start a stopped node's agent again")
    resume.add_argument("node", type=int)
    inside = commands.add_parser("exec", help="run a command in a node (0: the client)")
    inside.add_argument("node", type=int)
    inside.add_argument("argv", nargs=argparse.REMAINDER)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "up":
            if not 1 <= args.nodes <= 200:
                raise ClusterError("nodes: 1 to 200")
            layout = Layout(args.name, args.nodes, args.subnet)
            state = up(
                layout,
                lb=args.lb,
                profile=args.profile,
                dns_upstream=args.dns_upstream,
                extra=args.agent_arg,
                timeout=args.timeout,
                run_as=None if args.user is None else RunAs.parse(args.user, args.caps),
            )
            for node in state["nodes"]:
                print(f"n{node['index']}  {node['address']}  pid {node['pid']}  ns {node['ns']}")
            print(f"client  {state['client_address']}  ns {state['client']}")
            return 0
        if args.command == "down":
            down(args.name)
            return 0
        if args.command == "status":
            report = status(args.name)
            if args.json:
                print(json.dumps(report, indent=2))
            else:
                for node in report["nodes"]:
                    print(
                        f"{node['node']}  {node['address']}  pid {node['pid']}  "
                        f"{'running' if node['running'] else 'STOPPED'}  "
                        f"alive members: {node['members_alive']}"
                    )
            return 0 if all(n["running"] for n in report["nodes"]) else 1
        if args.command == "task":
            state = load(args.name)
            record = add_task(state, args.node, args.service, args.port, args.target)
            layout = Layout(args.name, len(state["nodes"]), state["subnet"])
            _save(layout, state)
            print(f"{record['name']}  {record['address']}:{record['port']}  pid {record['pid']}")
            return 0
        if args.command in ("stop", "start"):
            state = load(args.name)
            if args.command == "stop":
                stop_agent(state, args.node, signal.SIGKILL if args.kill else signal.SIGTERM)
            else:
                start_agent(state, args.node)
            layout = Layout(args.name, len(state["nodes"]), state["subnet"])
            _save(layout, state)
            return 0
        if args.command == "exec":
            state = load(args.name)
            ns = state["client"] if args.node == 0 else _node(state, args.node)["ns"]
            return exec_in(ns, args.argv)
    except ClusterError as exc:
        print(f"netns-cluster: {exc}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
