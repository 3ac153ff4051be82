"""checksum-export: accepted at once, hashed in the background, answered exactly once.

A checksum reads a whole device, which can outlast the broker's consumer timeout, so the
job does not hold its delivery: accept() flushes the export (flush-export's path), records
the job in export_checksums and returns, and the consumer acks the request. The hash runs
off the event loop (worker/blkhash.py in a thread, at most `concurrency` at once); its
reply is kept on the row and in the job ledger in one transaction, published with
confirms to the job's reply_to and correlation_id, and the row dropped. A worker that
starts resumes its node's rows (resume()): those without a reply are hashed again, those
with one are published. A redelivered or duplicated job finds its row, or its record, and
is not run twice. A release or relink of the export while it is hashed ends the job with
export_changed. Owns no SQL (worker/repository.py) and settles no message (consumer.py).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol, TypeVar

from worker.blkhash import HashResult, device_size, hash_fd
from worker.devices import device_identity
from worker.errors import ExportChanged, InvalidRequest, WorkerError
from worker.faults import crash_point
from worker.logs import bind_job
from worker.mappings import ChecksumJob, CommittedExport, JobRecord, Mapping
from worker.messages import (
    ChecksumExport,
    ChecksumProgress,
    ErrorCode,
    ExportChecksum,
    ExportFailed,
    Reply,
    export_name,
)
from worker.metrics import Metrics
from worker.publisher import ConfirmedPublisher
from worker.replies import ReplyPublisher, error_reply

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Pause before a database write or a publish the checksum needs is tried again.
RETRY_S = 2.0
#: How long close() waits for the hashing threads to notice the worker stops.
CLOSE_WAIT_S = 5.0


class ChecksumStore(Protocol):
    async def lookup(
        self, vm_id: str, disk_unit_number: int, job_id: str
    ) -> tuple[Mapping | None, JobRecord | None]: ...
    async def add_checksum(self, job: ChecksumJob) -> bool: ...
    async def checksum_jobs(self, job_id: str | None = None) -> list[ChecksumJob]: ...
    async def finish_checksum(self, job: ChecksumJob, record: JobRecord) -> bool: ...
    async def drop_checksum(self, job_id: str) -> None: ...
    async def committed_export(self, export_name: str) -> CommittedExport | None: ...


class Flusher(Protocol):
    async def flush_for_checksum(self, request: ChecksumExport) -> Mapping: ...


class _Stopped(Exception):
    """The worker stops: the job's row stays, and the next start hashes it again."""


@dataclass
class _Running:
    job_id: str
    started_at: datetime
    size: int = 0
    done: int = 0


def _reply_of(body: dict[str, object]) -> Reply:
    if body.get("status") == "checksummed":
        return ExportChecksum.model_validate(body)
    return ExportFailed.model_validate(body)


class Checksums:
    def __init__(
        self,
        store: ChecksumStore,
        flow: Flusher,
        *,
        link_for: Callable[[str], Path],
        node_id: str,
        reply_queue: str,
        metrics: Metrics,
        concurrency: int = 1,
        retry_s: float = RETRY_S,
    ) -> None:
        self._store = store
        self._flow = flow
        self._link_for = link_for
        self._node_id = node_id
        self._reply_queue = reply_queue
        self._metrics = metrics
        self._slots = asyncio.Semaphore(concurrency)
        self._retry_s = retry_s
        #: One task per job_id this process runs or publishes: never two for one job.
        self._tasks: dict[str, asyncio.Task[None]] = {}
        #: The checksum hashing each export now, for inspect-export.
        self._running: dict[str, _Running] = {}
        self._replies: ReplyPublisher | None = None
        self._attached = asyncio.Event()
        # Read by the hashing threads between blocks.
        self._stopping = threading.Event()
        self._resuming: asyncio.Task[None] | None = None

    def attach(self, publisher: ConfirmedPublisher | None) -> None:
        """The broker session's publisher (None: no session now)."""
        if publisher is None:
            self._replies = None
            self._attached.clear()
        else:
            self._replies = ReplyPublisher(publisher, self._reply_queue)
            self._attached.set()

    def progress(self, name: str) -> ChecksumProgress | None:
        running = self._running.get(name)
        if running is None:
            return None
        return ChecksumProgress(
            job_id=running.job_id,
            bytes_hashed=running.done,
            size=running.size,
            started_at=running.started_at,
        )

    async def accept(
        self, request: ChecksumExport, *, reply_to: str | None, correlation_id: str | None
    ) -> Reply | None:
        """The reply to give now (a job answered before), or None: the job is accepted
        (now or by an earlier delivery) and will be answered once hashed. Raises what a
        flush-export would (export_not_found, stale_generation, flush_failed, ...)."""
        _, recorded = await self._store.lookup(
            request.vm_id, request.disk_unit_number, request.job_id
        )
        if recorded is not None:
            return self._repeat(request, recorded)
        if existing := await self._store.checksum_jobs(request.job_id):
            # Accepted before: not run again, but answered where this delivery asks.
            again = replace(existing[0], reply_to=reply_to, correlation_id=correlation_id)
            await self._store.add_checksum(again)
            log.info("Checksum accepted before; not run again job_id=%s", request.job_id)
            return None
        mapping = await self._flow.flush_for_checksum(request)
        job = ChecksumJob.of(request, mapping, reply_to, correlation_id)
        if await self._store.add_checksum(job):
            log.info(
                "Checksum accepted job_id=%s export_name=%s algorithm=%s block_size=%d",
                *(job.job_id, request.export_name, job.algorithm, job.block_size),
            )
            self._start(job)
        return None

    async def run_now(self, request: ChecksumExport) -> ExportChecksum | ExportFailed:
        """What a checksum-export answers, computed and returned here (the command line):
        flushed and hashed the same way, nothing recorded, nothing published."""
        mapping = await self._flow.flush_for_checksum(request)
        return await self._hash(ChecksumJob.of(request, mapping, None, None))

    def _repeat(self, request: ChecksumExport, recorded: JobRecord) -> Reply:
        status = recorded.reply.get("status")
        if status not in ("checksummed", "error") or not recorded.is_for(
            request.vm_id, request.disk_unit_number
        ):
            raise InvalidRequest(
                f"job_id {request.job_id} was already used for another job (vm "
                f"{recorded.vm_id} disk {recorded.disk_unit_number}); a new job needs a new "
                "job_id"
            )
        log.info("Checksum answered before; repeating its reply job_id=%s", request.job_id)
        return _reply_of(recorded.reply)

    async def resume(self) -> int:
        """Takes up this node's checksums a stopped worker left: hashes again those not
        finished, publishes the others' replies. How many. Raises WorkerError when the
        database does not answer."""
        jobs = await self._store.checksum_jobs()
        for job in jobs:
            log.info("Resuming a checksum job_id=%s hashed=%s", job.job_id, job.reply is not None)
            self._start(job)
        return len(jobs)

    def start_resume(self) -> None:
        """resume() in the background, tried again until it succeeds: a database away at
        start-up delays the checksums left, not the worker's start."""

        async def resume() -> None:
            while True:
                try:
                    await self.resume()
                except WorkerError as exc:
                    log.warning("Could not resume checksums; trying again error=%s", exc)
                else:
                    return
                await asyncio.sleep(self._retry_s)

        self._resuming = asyncio.create_task(resume())

    def _start(self, job: ChecksumJob) -> None:
        if job.job_id in self._tasks:
            return
        # A context of its own: the job that accepted it has been answered long since.
        task = asyncio.create_task(self._run(job), context=contextvars.Context())
        self._tasks[job.job_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(job.job_id, None))

    async def close(self) -> None:
        """Stops hashing and publishing; unanswered jobs stay for the next start."""
        self._stopping.set()
        tasks = list(self._tasks.values())
        if self._resuming is not None:
            tasks.append(self._resuming)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=CLOSE_WAIT_S)

    async def _run(self, job: ChecksumJob) -> None:
        bind_job(job_id=job.job_id, vm_id=job.vm_id, disk=job.disk_unit_number)
        try:
            if job.reply is not None:
                reply = _reply_of(json.loads(job.reply))
            else:
                reply = await self._hash(job)
                record = JobRecord(
                    job_id=job.job_id,
                    vm_id=job.vm_id,
                    disk_unit_number=job.disk_unit_number,
                    reply=reply.model_dump(mode="json"),
                )
                if not await self._persist(lambda: self._store.finish_checksum(job, record)):
                    return  # another run of it finished first, and publishes its reply
                outcome = reply.error.code if isinstance(reply, ExportFailed) else reply.status
                self._metrics.checksums.labels(outcome=str(outcome)).inc()
            await self._publish(job, reply)
        except _Stopped:
            log.info("Checksum left for the next start job_id=%s", job.job_id)
        except Exception:
            log.exception("Checksum failed unexpectedly job_id=%s", job.job_id)

    async def _persist(self, write: Callable[[], Awaitable[T]]) -> T:
        """A database step the answer needs, tried again until it is done or the worker
        stops: giving up would leave the job unanswered until a restart."""
        while True:
            try:
                return await write()
            except WorkerError as exc:
                log.warning("Checksum step failed; trying again error=%s", exc)
            if self._stopping.is_set():
                raise _Stopped
            await asyncio.sleep(self._retry_s)

    async def _publish(self, job: ChecksumJob, reply: Reply) -> None:
        # Where the last delivery of the job asked for the answer (see add_checksum).
        if latest := await self._persist(lambda: self._store.checksum_jobs(job.job_id)):
            job = latest[0]
        while True:
            await self._attached.wait()
            replies = self._replies
            if replies is not None:
                try:
                    await replies.publish(
                        reply, reply_to=job.reply_to, correlation_id=job.correlation_id
                    )
                    break
                except Exception as exc:
                    log.warning("Checksum reply not confirmed; trying again error=%s", exc)
            await asyncio.sleep(self._retry_s)
        log.info("Checksum answered job_id=%s status=%s", job.job_id, reply.status)
        # A crash before the row goes publishes the reply again at the next start:
        # identical, like any reply retried after a lost confirm.
        await self._persist(lambda: self._store.drop_checksum(job.job_id))

    async def _hash(self, job: ChecksumJob) -> ExportChecksum | ExportFailed:
        name = export_name(job.vm_id, job.disk_unit_number)
        async with self._slots:
            running = _Running(job.job_id, datetime.now(UTC))
            self._running[name] = running
            self._metrics.checksums_running.inc()
            started = time.monotonic()
            try:
                result = await asyncio.to_thread(self._hash_device, job, name, running)
                # Still the device the export serves (a release may have come between the
                # last block and now)?
                await self._check_still_served(job, name)
            except ExportChanged as exc:
                log.warning("Checksum ended: the export changed job_id=%s: %s", job.job_id, exc)
                return self._failed(job, ErrorCode.EXPORT_CHANGED, str(exc))
            except OSError as exc:
                log.warning("Checksum could not read job_id=%s error=%s", job.job_id, exc)
                return self._failed(
                    job, ErrorCode.INTERNAL_ERROR, f"reading {job.device_path} failed: {exc}"
                )
            except _Stopped:
                raise
            except Exception:
                # A bug: answered (once) rather than left to fail again at every start.
                log.exception("Checksum failed job_id=%s", job.job_id)
                return self._failed(
                    job, ErrorCode.INTERNAL_ERROR, "unexpected internal error; see the worker log"
                )
            finally:
                self._metrics.checksums_running.dec()
                if self._running.get(name) is running:
                    del self._running[name]
        elapsed = time.monotonic() - started
        log.info(
            "Checksum done job_id=%s export_name=%s size=%d zero_bytes=%d elapsed_s=%.3f",
            *(job.job_id, name, result.size, result.zero_bytes, elapsed),
        )
        return ExportChecksum(
            job_id=job.job_id,
            vm_id=job.vm_id,
            disk_unit_number=job.disk_unit_number,
            export_name=name,
            device_path=job.device_path,
            node_id=self._node_id,
            algorithm=job.algorithm,
            block_size=job.block_size,
            checksum=result.checksum,
            size=result.size,
            zero_bytes=result.zero_bytes,
            elapsed_s=round(elapsed, 3),
        )

    async def _check_still_served(self, job: ChecksumJob, name: str) -> None:
        committed = await self._persist(lambda: self._store.committed_export(name))
        if committed is None or committed.device_path != job.device_path:
            raise ExportChanged(f"export {name} was released or relinked while hashed")

    def _failed(self, job: ChecksumJob, code: ErrorCode, message: str) -> ExportFailed:
        failed = error_reply(code, message, job_id=job.job_id, node_id=self._node_id)
        return failed.model_copy(
            update={"vm_id": job.vm_id, "disk_unit_number": job.disk_unit_number}
        )

    def _hash_device(self, job: ChecksumJob, name: str, running: _Running) -> HashResult:
        """In a thread: hashes what a new connection to the export opens (its link), as long
        as the link opens the job's device. Raises ExportChanged, _Stopped, OSError."""
        link = self._link_for(name)

        def serves_job() -> None:
            try:
                now = device_identity(os.stat(link))
            except FileNotFoundError:
                raise ExportChanged(f"export {name} was released while hashed") from None
            if now != job.device_id:
                raise ExportChanged(f"export {name} was relinked to another device while hashed")

        serves_job()
        fd = os.open(link, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if device_identity(os.fstat(fd)) != job.device_id:
                raise ExportChanged(f"export {name} was relinked to another device while hashed")
            running.size = device_size(fd)

            def on_block(done: int, length: int) -> None:
                if running.done < running.size // 2 <= done:
                    crash_point("checksum_half_hashed")  # for the restart test
                running.done = done
                self._metrics.checksum_bytes.inc(length)
                if self._stopping.is_set():
                    raise _Stopped
                serves_job()  # one stat a block: a release or relink ends the hash at once

            return hash_fd(
                fd, block_size=job.block_size, algorithm=job.algorithm, on_block=on_block
            )
        finally:
            os.close(fd)
