"""The sandbox manager: keeps this node's networks and sandboxes in the kernel in step
with the state.

A `View` of the change feed. What to do is decided by `mesh.sandbox.plan` (sans-IO);
this shell runs the jobs in feed order: the kernel work (namespaces, drivers) on one
worker thread, so a slow `ip`/netlink call never stalls the event loop and two jobs
never interleave; then, on the loop, the sandbox's DNS and load balancer
(`open_sandbox`/`close_sandbox`), whose sockets and tasks live there.

On start (`load`) the first job is the reconciliation: what the kernel holds under
our prefixes is compared with the state; orphans are removed (namespaces with this
node's prefix, veths and bridges the state does not own), missing objects made
again, and every sandbox's DNS and LB opened. A clean stop leaves sandboxes and
networks in place: tasks are durable and go only when their record goes. A kill -9
leaves them too; the next start's reconciliation picks them up.

Before a namespace we made goes (its task removed, or an orphan at the
reconciliation), every process inside it is ended (`mesh.sandbox.procs`: SIGTERM,
SIGKILL after `term_grace` seconds, waited for on the loop): a detached task's
command would otherwise run on in the unnamed namespace. Never in an adopted one.

Encrypted overlays (`--opt encrypted`): their IPsec (`mesh.sandbox.xfrm`) and
filter (`mesh.sandbox.espfilter`) are programmed by a job of their own on the same
worker thread, whenever `mesh.sandbox.encryption` says the want changed: the
served encrypted overlays, the other alive nodes' VTEPs, the keyring (polled
every `ESP_TICK` seconds: it changes in place, by `mesh keyring` or by gossip,
with no callback), the data-path port.

`ready(task_id)` is what the API awaits after creating a sandboxed task: it returns
once that task's sandbox is up, or raises `SandboxFailed` with the reason.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol, TypeVar

from mesh.core.logs import event
from mesh.core.model import Change, Network, Node, Record, Task
from mesh.errors import SandboxFailed
from mesh.sandbox import encryption, esp, espfilter, procs, xfrm
from mesh.sandbox.driver import Driver, DriverError
from mesh.sandbox.encryption import EspSchedule, EspWant
from mesh.sandbox.esp import EspError
from mesh.sandbox.names import netns_path, netns_prefix
from mesh.sandbox.overlay import Peer
from mesh.sandbox.peers import PeerEntry, PeerTable
from mesh.sandbox.plan import (
    CreateNetwork,
    DeleteNamespace,
    DeleteNetwork,
    DeleteVeth,
    EnsureSandbox,
    Found,
    Job,
    Leave,
    NetworkWant,
    RemoveSandbox,
    SandboxWant,
    SyncPeers,
    network_transition,
    network_want,
    reconcile,
    sandbox_transition,
    sandbox_want,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


#: seconds `ready` waits for the DNS and LB to have applied a new sandbox
SETTLE_TIMEOUT = 5.0
#: seconds before an overlay's peers are programmed again after `set_peers` failed
PEER_RETRY = 2.0
#: seconds between two looks at the keyring (and retries of a failed encryption sync)
ESP_TICK = 1.0
#: seconds between two reads of the encrypted overlays' drop counters
ESP_COUNTERS_EVERY = 5.0

#: where an agent's keyring is read from: the keys, primary first; None without one
KeyringSource = Callable[[], Iterable[bytes] | None]


class Namespaces(Protocol):
    """Named network namespaces (`mesh.sandbox.netns.Sandboxes`)."""

    def create(self, name: str) -> str: ...
    def adopt(self, spec: str) -> str: ...
    def delete(self, name: str) -> None: ...
    def list(self, prefix: str) -> list[str]: ...
    def write_resolv_conf(self, name: str) -> None: ...


class SandboxServer(Protocol):
    """What serves inside a sandbox: the DNS service, the load balancer."""

    def open_sandbox(self, key: str, netns: str, networks: tuple[str, ...]) -> None: ...
    def close_sandbox(self, key: str) -> None: ...


class _Reconcile:
    """The first job: compare the kernel with the state as loaded."""

    def __init__(self, networks: list[NetworkWant], sandboxes: list[SandboxWant]) -> None:
        self.networks = networks
        self.sandboxes = sandboxes


class _Mark:
    """Not a job: set once every job queued before it has run."""

    def __init__(self, marker: asyncio.Event) -> None:
        self.marker = marker


class _SyncEsp:
    """The encrypted overlays' IPsec and filter, as wanted when it runs; with
    `counters_only`, just a read of the filter's drop counters."""

    def __init__(self, counters_only: bool = False) -> None:
        self.counters_only = counters_only


class _Progress:
    """One task's sandbox: pending, up, or failed with a reason."""

    def __init__(self) -> None:
        self.done = asyncio.Event()
        self.failure: str | None = None


@dataclasses.dataclass(slots=True)
class ManagerStats:
    ensured: int = 0
    removed: int = 0
    failed: int = 0
    orphans_removed: int = 0
    repaired: int = 0
    #: overlay peer tables programmed (`set_peers` calls that changed the wanted set)
    peer_syncs: int = 0
    #: encrypted overlays: syncs of IPsec and filter that succeeded, that failed
    esp_syncs: int = 0
    esp_failures: int = 0
    #: processes ended in sandboxes we made, before removing them (SIGTERM or SIGKILL);
    #: of those, the ones that needed SIGKILL; those still there when the namespace went
    processes_ended: int = 0
    processes_killed: int = 0
    processes_left: int = 0


class SandboxManager:
    def __init__(
        self,
        node: str,
        drivers: Mapping[str, Driver],
        namespaces: Namespaces,
        servers: Iterable[SandboxServer],
        delete_link: Callable[[str], None],
        host: procs.Host | None = None,
        term_grace: float = procs.TERM_GRACE,
    ) -> None:
        self.node = node
        self.prefix = netns_prefix(node)
        self._drivers = dict(drivers)
        self._namespaces = namespaces
        self._servers = tuple(servers)
        self._delete_link = delete_link
        #: the processes of this host: those of a sandbox we made end before it goes
        self._host = host if host is not None else procs.Host()
        self._term_grace = term_grace
        self._records: dict[str, Network] = {}
        self._networks: dict[str, NetworkWant] = {}
        #: the overlay peer table, and this node's own address on each overlay
        self._peers = PeerTable(node)
        self._host_addresses: dict[str, str] = {}
        #: overlays with a SyncPeers queued; what each overlay's kernel has, by net id
        self._peers_pending: set[str] = set()
        self._programmed: dict[str, frozenset[PeerEntry]] = {}
        #: network ids whose CreateNetwork this process ran (peers go only on those)
        self._made: set[str] = set()
        self._sandboxes: dict[str, SandboxWant] = {}
        #: this node's live tasks (their sandboxes follow this node's overlay addresses)
        self._tasks: dict[str, Task] = {}
        self._progress: dict[str, _Progress] = {}
        #: the sandboxes whose DNS and LB are open here, by task id
        self._serving: dict[str, SandboxWant] = {}
        #: encrypted overlays: the keyring, what is programmed, the last sync's figures
        self._keyring: KeyringSource = lambda: None
        self._esp = EspSchedule()
        self._esp_report = xfrm.SyncReport()
        self._esp_drops: dict[str, int] = dict.fromkeys(espfilter.COUNTERS, 0)
        self._esp_counters_at = 0.0
        self._ticker: asyncio.Task[None] | None = None
        self._queue: asyncio.Queue[Job | _Reconcile | _Mark | _SyncEsp] = asyncio.Queue()
        self._thread = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="sandbox"
        )
        self._runner: asyncio.Task[None] | None = None
        self.stats = ManagerStats()

    # -- the view -------------------------------------------------------------------------

    def load(self, records: Iterable[Record]) -> None:
        tasks: list[Task] = []
        records = list(records)
        self._peers.load(records)
        for record in records:
            if isinstance(record, Network) and not record.deleted:
                self._records[record.name] = record
            elif isinstance(record, Task):
                tasks.append(record)
            elif isinstance(record, Node) and record.name == self.node and not record.deleted:
                self._host_addresses = dict(record.addresses)
        for network in self._records.values():
            want = network_want(network, self.node, self._host_addresses.get(network.name))
            if want is not None:
                self._networks[network.name] = want
        for task in tasks:
            sandbox = sandbox_want(task, self.node, self._records, self._host_addresses)
            if sandbox is not None:
                self._tasks[task.id] = task
                self._sandboxes[task.id] = sandbox
                self._progress[task.id] = _Progress()
        # The encrypted overlays' filter (and IPsec) first, before any peer is programmed.
        self._esp_check()
        self._queue.put_nowait(
            _Reconcile(list(self._networks.values()), list(self._sandboxes.values()))
        )

    def on_change(self, change: Change) -> None:
        after = change.after
        touched = self._peers.update(after)
        if isinstance(after, Network):
            if after.deleted:
                self._records.pop(after.name, None)
            else:
                self._records[after.name] = after
            self._network_changed(after.name)
        elif isinstance(after, Task):
            self._task_changed(after)
        elif isinstance(after, Node) and after.name == self.node:
            # This node's own overlay addresses: its bridges carry them, its sandboxes
            # on overlays route by them.
            addresses = {} if after.deleted else dict(after.addresses)
            if addresses != self._host_addresses:
                self._host_addresses = addresses
                for name in sorted(self._records):
                    if self._records[name].driver == "overlay":
                        self._network_changed(name)
                for want in list(self._sandboxes.values()):
                    if any(e.driver == "overlay" for e in want.endpoints):
                        task = self._tasks.get(want.task_id)
                        if task is not None:
                            self._task_changed(task)
        # Encryption before peers: an encrypted network's filter is in place before its
        # VXLAN can reach another node (a new network's CreateNetwork is queued already).
        self._esp_check()
        for name in sorted(touched):
            self._enqueue([SyncPeers(name)])

    def use_keyring(self, source: KeyringSource) -> None:
        """Where encrypted overlays take their keys: the gossip keyring, read again
        every `ESP_TICK` seconds."""
        self._keyring = source
        self._esp_check()

    def _network_changed(self, name: str) -> None:
        record = self._records.get(name)
        before = self._networks.pop(name, None)
        after = (
            None
            if record is None
            else network_want(record, self.node, self._host_addresses.get(name))
        )
        if after is not None:
            self._networks[name] = after
        self._enqueue(network_transition(before, after))

    def _task_changed(self, task: Task) -> None:
        if task.deleted or task.node != self.node:
            self._tasks.pop(task.id, None)
        else:
            self._tasks[task.id] = task
        before_sbx = self._sandboxes.pop(task.id, None)
        after_sbx = sandbox_want(task, self.node, self._records, self._host_addresses)
        if after_sbx is not None:
            self._sandboxes[task.id] = after_sbx
            if after_sbx != before_sbx:
                self._progress[task.id] = _Progress()
        else:
            self._progress.pop(task.id, None)
        self._enqueue(sandbox_transition(before_sbx, after_sbx))

    def _enqueue(self, jobs: list[Job]) -> None:
        for job in jobs:
            if isinstance(job, CreateNetwork):
                # a SyncPeers queued before it may run on what the create then replaces
                self._peers_pending.discard(job.want.plan.name)
            elif isinstance(job, SyncPeers):
                if job.network not in self._networks or job.network in self._peers_pending:
                    continue  # not served here, or queued already: it reads the table then
                self._peers_pending.add(job.network)
            self._queue.put_nowait(job)
            if isinstance(job, CreateNetwork) and job.want.driver == "overlay":
                # An encrypted network's filter and IPsec right after its devices and
                # before its peers: none of its VXLAN can leave plain in between.
                self._esp_check()

    # -- what the API awaits ----------------------------------------------------------------

    # The API's SandboxPort names the bound `timeout` (spec15): kept as the contract says.
    async def ready(self, task_id: str, timeout: float) -> None:  # noqa: ASYNC109
        """Return once the task's sandbox and endpoints exist; raise SandboxFailed
        (the reason) when they could not be made, or not within `timeout` seconds."""
        progress = self._progress.get(task_id)
        if progress is None:
            raise SandboxFailed(f"task {task_id} has no sandbox on node {self.node}")
        try:
            await asyncio.wait_for(progress.done.wait(), timeout)
        except TimeoutError:
            raise SandboxFailed(
                f"the sandbox of task {task_id} was not up within {timeout:g}s"
            ) from None
        if progress.failure is not None:
            raise SandboxFailed(progress.failure)
        # The LB inside the sandbox is queued by open_sandbox, not yet programmed: a
        # command started at once (`mesh run -- curl http://web/`) would find the VIP
        # not balanced yet. Wait (bounded, best effort) for the servers to settle.
        for server in self._servers:
            settled = getattr(server, "settled", None)
            if settled is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(settled(), SETTLE_TIMEOUT)

    def describe(self) -> dict[str, object]:
        """What this node keeps and the manager's counters (`GET /v1/agent`)."""
        synced = self._esp.synced
        return {
            "enabled": True,
            "prefix": self.prefix,
            "networks": sorted(self._networks),
            "overlays": {
                name: {
                    "vni": want.plan.vni,
                    "host_address": want.plan.host_address,
                    "peers": len(self._peers.peers(name)),
                }
                for name, want in sorted(self._networks.items())
                if want.driver == "overlay"
            },
            "encryption": {
                "networks": self._encrypted_networks(),
                "peers": len(synced.remotes) if synced is not None else 0,
                "synced": synced is not None,
                "error": self._esp.last_error,
                "collisions": self._esp_report.collisions,
                "rejected_remotes": self._esp_report.rejected_remotes,
                **self._esp_drops,
            },
            "sandboxes": len(self._sandboxes),
            "stats": dataclasses.asdict(self.stats),
        }

    # -- the shell --------------------------------------------------------------------------

    async def start(self) -> None:
        self._runner = asyncio.create_task(self._run(), name="sandbox-manager")
        if self._overlay_esp() is not None:
            self._ticker = asyncio.create_task(self._esp_ticks(), name="sandbox-esp-ticks")

    async def stop(self) -> None:
        """Stop taking jobs; the one running finishes (a thread cannot be cut short).
        Sandboxes and networks stay: they go with their records only."""
        for task in (self._ticker, self._runner):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await asyncio.to_thread(self._thread.shutdown, wait=True)

    async def _run(self) -> None:
        while True:
            job = await self._queue.get()
            if isinstance(job, _Mark):
                job.marker.set()
                continue
            try:
                if isinstance(job, _Reconcile):
                    await self._reconcile(job)
                elif isinstance(job, _SyncEsp):
                    await self._sync_esp(job)
                else:
                    await self._do(job)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug: logged, and the next job still runs
                event(log, "sandbox_job_failed", logging.ERROR, job=repr(job), error=repr(exc))
                log.exception("sandbox job %r failed", job)

    async def _in_thread(self, fn: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, fn, *args)

    async def _reconcile(self, job: _Reconcile) -> None:
        try:
            found = await self._in_thread(self._find)
        except Exception as exc:
            # Nothing known of the kernel: remove nothing, but still make (idempotently)
            # and serve every sandbox the state has.
            self.stats.failed += 1
            event(log, "sandbox_scan_failed", logging.ERROR, error=repr(exc))
            found = Found({}, {}, frozenset())
        plan = reconcile(job.networks, job.sandboxes, found)
        removed = plan.removed
        event(
            log,
            "sandboxes_reconciled",
            networks=len(job.networks),
            sandboxes=len(job.sandboxes),
            removed=[_describe_removal(r) for r in removed],
            created_networks=sorted(plan.created),
            repaired=sorted(plan.repaired),
        )
        self.stats.orphans_removed += len(removed)
        self.stats.repaired += len(plan.repaired)
        for step in plan.jobs:
            await self._do(step)

    def _find(self) -> Found:
        networks: dict[str, frozenset[str]] = {}
        veths: dict[str, frozenset[str]] = {}
        for name, driver in self._drivers.items():
            owned = driver.owned()
            networks[name] = frozenset(owned.networks)
            veths[name] = frozenset(owned.endpoints)
        namespaces = frozenset(
            n for n in self._namespaces.list(self.prefix) if n.startswith(self.prefix)
        )
        return Found(networks, veths, namespaces)

    async def _do(self, job: Job) -> None:
        match job:
            case CreateNetwork(want):
                self._programmed.pop(want.plan.id, None)
                if await self._kernel(job, self._driver(want.driver).create_network, want.plan):
                    self._made.add(want.plan.id)
            case DeleteNetwork(driver, net_id):
                self._made.discard(net_id)
                self._programmed.pop(net_id, None)
                await self._kernel(job, self._driver(driver).delete_network, net_id)
            case SyncPeers(network):
                await self._sync_peers(job, network)
            case EnsureSandbox(want):
                await self._ensure(want)
            case RemoveSandbox(want):
                await self._remove(want)
            case Leave(sandbox, endpoint):
                leave = self._driver(endpoint.driver).leave
                await self._kernel(job, leave, endpoint.network, endpoint.endpoint, sandbox.netns)
            case DeleteNamespace(name):
                await self._end_processes(name, None)
                await self._kernel(job, self._delete_namespace, name)
            case DeleteVeth(name):
                await self._kernel(job, self._delete_link, name)

    async def _sync_peers(self, job: SyncPeers, network: str) -> None:
        """The overlay's entries, as the table is now (later changes queue another)."""
        self._peers_pending.discard(network)
        want = self._networks.get(network)
        if want is None or want.driver != "overlay" or want.plan.id not in self._made:
            return  # not served here (any more), or its CreateNetwork is still to run
        peers = self._peers.peers(network)
        if self._programmed.get(want.plan.id) == peers:
            return
        set_peers = getattr(self._driver(want.driver), "set_peers", None)
        if set_peers is None:
            raise DriverError(f"the {want.driver} driver cannot program peers")
        wanted = [Peer(mac=p.mac, address=p.address, vtep=p.vtep) for p in sorted(peers)]
        if await self._kernel(job, set_peers, want.plan, wanted):
            self._programmed[want.plan.id] = peers
            self.stats.peer_syncs += 1
            event(log, "overlay_peers", network=network, peers=len(peers))
        else:
            # Failed (counted, logged once per try): the kernel may lack what the table
            # wants until the next change, so try again later, as the table is then.
            loop = asyncio.get_running_loop()
            retry: list[Job] = [SyncPeers(network)]
            loop.call_later(PEER_RETRY, self._enqueue, retry)

    # -- encrypted overlays -------------------------------------------------------------

    def _overlay_esp(self) -> tuple[str, str | None, int] | None:
        """(VTEP, node namespace, data-path port) of this node's overlay driver; None
        when it serves no overlays (nothing to encrypt)."""
        overlay = self._drivers.get("overlay")
        vtep = getattr(overlay, "vtep", None)
        if overlay is None or not isinstance(vtep, str):
            return None
        netns = getattr(overlay, "node_netns", None)
        port = getattr(overlay, "port", None)
        return (
            vtep,
            netns if isinstance(netns, str) else None,
            port if isinstance(port, int) else esp.DEFAULT_PORT,
        )

    def _esp_want(self) -> EspWant | None:
        where = self._overlay_esp()
        if where is None:
            return None
        overlays = [
            (want.plan.vni, want.plan.options)
            for want in self._networks.values()
            if want.driver == "overlay"
        ]
        try:
            keyring = self._keyring()
        except Exception:  # a keyring being changed: read again at the next tick
            return None
        return encryption.want(overlays, self._peers.vteps(), keyring, where[2])

    def _encrypted_networks(self) -> list[str]:
        """The encrypted overlays this node serves (programmed or not: see `synced`)."""
        wanted = self._esp_want() or encryption.NONE
        return sorted(
            name
            for name, want in self._networks.items()
            if want.driver == "overlay" and want.plan.vni in wanted.vnis
        )

    def _esp_check(self) -> None:
        """Queue a sync when the want changed (cheap: runs on every change and tick)."""
        wanted = self._esp_want()
        if wanted is not None and self._esp.due(wanted, time.monotonic()):
            self._esp.started()
            self._queue.put_nowait(_SyncEsp())

    async def _esp_ticks(self) -> None:
        while True:
            await asyncio.sleep(ESP_TICK)
            self._esp_check()
            wanted = self._esp_want()
            now = time.monotonic()
            if wanted is not None and wanted.active and now >= self._esp_counters_at:
                self._esp_counters_at = now + ESP_COUNTERS_EVERY
                self._queue.put_nowait(_SyncEsp(counters_only=True))

    async def _sync_esp(self, job: _SyncEsp) -> None:
        where = self._overlay_esp()
        if where is None:
            return
        if job.counters_only:
            with contextlib.suppress(Exception):
                self._esp_drops = await self._in_thread(espfilter.counters, where[1])
            return
        wanted = self._esp_want()
        if wanted is None:
            self._esp.queued = False
            return
        try:
            report = await self._in_thread(program_esp, wanted, *where)
        except Exception as exc:
            self.stats.esp_failures += 1
            if self._esp.failed(wanted, str(exc), time.monotonic()):
                event(log, "overlay_encryption_failed", logging.WARNING, error=str(exc))
            return
        self._esp.succeeded(wanted)
        self._esp_report = report
        if not wanted.active:
            self._esp_drops = dict.fromkeys(espfilter.COUNTERS, 0)  # the table went
        self.stats.esp_syncs += 1
        if report.changed or report.collisions or report.rejected_remotes:
            event(
                log,
                "overlay_encryption",
                vnis=sorted(wanted.vnis),
                peers=len(wanted.remotes),
                keys=len(wanted.keys),
                sas_added=report.sas_added,
                sas_removed=report.sas_removed,
                collisions=report.collisions,
                rejected_remotes=report.rejected_remotes,
            )

    def _driver(self, name: str) -> Driver:
        try:
            return self._drivers[name]
        except KeyError:
            raise SandboxFailed(f"this agent has no {name} driver") from None

    async def _kernel(self, job: Job, fn: Callable[..., None], *args: object) -> bool:
        """One kernel step on the worker thread; a failure is logged with the job and
        counted, and the jobs after it still run."""
        try:
            await self._in_thread(fn, *args)
        except Exception as exc:
            self.stats.failed += 1
            event(log, "sandbox_step_failed", logging.WARNING, job=repr(job), error=str(exc))
            return False
        return True

    async def _end_processes(self, name: str, task_id: str | None) -> None:
        """End every process in our namespace `name` (a detached task's command), as
        `docker rm -f` does: else it keeps the namespace alive, unnamed, and runs on.
        Called for namespaces we made only: an adopted one's processes are not ours."""
        if not name.startswith(self.prefix):
            return
        host = self._host
        inode = await self._in_thread(host.netns_inode, netns_path(name))
        if inode is None:
            return  # already gone (or never mounted): nothing can be in it by that name

        async def find() -> list[int]:
            return await self._in_thread(host.find, inode)

        loop = asyncio.get_running_loop()
        try:
            ended = await procs.end_processes(
                find, host.kill, asyncio.sleep, loop.time, self._term_grace
            )
        except Exception as exc:  # the namespace still goes: logged, counted
            self.stats.failed += 1
            event(log, "sandbox_processes_failed", logging.WARNING, netns=name, error=repr(exc))
            return
        if not ended.signalled and not ended.left:
            return
        self.stats.processes_ended += ended.ended
        self.stats.processes_killed += ended.killed
        self.stats.processes_left += ended.left
        level = logging.WARNING if ended.left else logging.INFO
        # task: the removed task's id; none for an orphan removed by the reconcile
        whose = {} if task_id is None else {"task": task_id}
        event(
            log,
            "sandbox_processes_ended",
            level,
            **whose,
            netns=name,
            ended=ended.ended,
            killed=ended.killed,
            left=ended.left,
        )

    def _delete_namespace(self, name: str) -> None:
        # Never a name without this node's exact prefix: namespaces are global files.
        if not name.startswith(self.prefix):
            raise ValueError(f"{name} is not a namespace of node {self.node}")
        self._namespaces.delete(name)

    async def _ensure(self, want: SandboxWant) -> None:
        progress = self._progress.get(want.task_id)
        try:
            path = await self._in_thread(self._make, want)
            for server in self._servers:
                server.open_sandbox(want.task_id, path, want.networks)
        except Exception as exc:
            self.stats.failed += 1
            reason = f"sandbox of task {want.task_id}: {exc}"
            event(log, "sandbox_failed", logging.WARNING, task=want.task_id, error=str(exc))
            if progress is not None:
                progress.failure = reason
                progress.done.set()
            return
        self._serving[want.task_id] = dataclasses.replace(want, netns=path)
        self.stats.ensured += 1
        event(log, "sandbox_up", task=want.task_id, netns=path, networks=list(want.networks))
        if progress is not None and self._progress.get(want.task_id) is progress:
            progress.failure = None
            progress.done.set()

    def _make(self, want: SandboxWant) -> str:
        """On the worker thread: the namespace, its resolv.conf, every endpoint."""
        if want.name is None:
            path = self._namespaces.adopt(want.netns)
        else:
            path = self._namespaces.create(want.name)
            self._namespaces.write_resolv_conf(want.name)
        for endpoint in want.endpoints:
            self._driver(endpoint.driver).join(endpoint.network, endpoint.endpoint, path)
        return path

    async def _remove(self, want: SandboxWant) -> None:
        if want.name is not None:  # ours: its processes end first (never an adopted one's)
            await self._end_processes(want.name, want.task_id)
        serving = self._serving.pop(want.task_id, None)
        for server in self._servers:
            try:
                server.close_sandbox(want.task_id)
            except Exception as exc:
                event(
                    log, "sandbox_close_failed", logging.WARNING, task=want.task_id, error=repr(exc)
                )
        netns = serving.netns if serving is not None else want.netns
        for endpoint in reversed(want.endpoints):
            await self._kernel(
                Leave(want, endpoint),
                self._driver(endpoint.driver).leave,
                endpoint.network,
                endpoint.endpoint,
                netns,
            )
        if want.name is not None:
            await self._kernel(DeleteNamespace(want.name), self._delete_namespace, want.name)
        self.stats.removed += 1
        event(log, "sandbox_removed", task=want.task_id, netns=netns, adopted=want.adopted)

    async def idle(self) -> None:
        """Wait until every job queued so far has run (for tests and `mesh doctor`)."""
        marker = asyncio.Event()
        self._queue.put_nowait(_Mark(marker))
        await marker.wait()


def _describe_removal(job: DeleteNamespace | DeleteVeth | DeleteNetwork) -> str:
    match job:
        case DeleteNamespace(name):
            return f"netns {name}"
        case DeleteVeth(name):
            return f"veth {name}"
        case DeleteNetwork(driver, net_id):
            return f"{driver} network {net_id}"


def program_esp(wanted: EspWant, vtep: str, node_netns: str | None, port: int) -> xfrm.SyncReport:
    """On the worker thread: make the kernel hold `wanted`. The filter goes first: it
    drops an encrypted network's VXLAN that no policy transforms, so a failure later
    (no keyring, a kernel without ESP) leaves the network silent, never in clear text.
    Nothing encrypted: our SAs and policies go, then the filter."""
    if not wanted.active:
        report = xfrm.clear(node_netns)
        espfilter.remove(node_netns)
        return report
    espfilter.apply(wanted.vnis, port, node_netns)
    if not wanted.keys:
        raise EspError(
            "encrypted overlays need the cluster keyring, and this agent has none "
            "(it runs with --insecure-gossip); their traffic is dropped"
        )
    try:
        return xfrm.sync_pairs(vtep, wanted.remotes, wanted.keys, wanted.keys[0], port, node_netns)
    except xfrm.XfrmError as exc:
        raise xfrm.XfrmError(
            f"the IPsec of the encrypted overlays (VNIs {sorted(wanted.vnis)}) could not be "
            f"programmed, their traffic is dropped: {exc}"
        ) from exc
