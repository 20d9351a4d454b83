"""Worker processes that share the agent's hot ports: started, watched, restarted, stopped.

A worker that exits while the agent runs is started again after a pause that
doubles with each quick failure (up to 30 s), so a worker that cannot start
does not spin. On stop every worker gets SIGTERM, then SIGKILL if it lingers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Sequence

from mesh.core.logs import event

log = logging.getLogger(__name__)

STOP_GRACE = 5.0
MAX_BACKOFF = 30.0
HEALTHY_RUN = 10.0  # a worker that ran this long resets the back-off
#: the environment variable that tells a worker its index in its pool
WORKER_INDEX = "MESHPLANE_WORKER_INDEX"


class WorkerPool:
    def __init__(self, name: str, argv: Sequence[str], count: int) -> None:
        self.name = name
        self._argv = list(argv)
        self._count = count
        self._tasks: list[asyncio.Task[None]] = []
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._stopping = False

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._keep(i), name=f"{self.name}-{i}") for i in range(self._count)
        ]

    async def _keep(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        backoff = 0.5
        while not self._stopping:
            started = loop.time()
            # Its index, which the worker reports with its figures (a restart keeps it).
            env = {**os.environ, WORKER_INDEX: str(index)}
            proc = await asyncio.create_subprocess_exec(*self._argv, env=env)
            self._procs[index] = proc
            event(log, "worker_started", pool=self.name, index=index, pid=proc.pid)
            code = await proc.wait()
            if self._stopping:
                return
            event(
                log,
                "worker_exited",
                logging.WARNING,
                pool=self.name,
                index=index,
                pid=proc.pid,
                code=code,
            )
            backoff = 0.5 if loop.time() - started > HEALTHY_RUN else min(backoff * 2, MAX_BACKOFF)
            await asyncio.sleep(backoff)

    async def stop(self) -> None:
        self._stopping = True
        for proc in self._procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for proc in self._procs.values():
            try:
                await asyncio.wait_for(proc.wait(), STOP_GRACE)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
