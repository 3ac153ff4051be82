"""The job ledger: records each answered job by job_id, many records per INSERT.

A redelivered or duplicated job is answered from its record (see ExportFlow), so it never
changes anything twice. Records that must be durable before the reply (a job that changed
a mapping) are awaited; concurrent ones share one INSERT, so a burst of creates costs one
round trip, not one per job. A reuse's record is written in the background, a few
milliseconds after its reply: a reuse changes nothing, so a record lost to a crash in
between costs little: a redelivery is evaluated again and, unless another job changed the
disk meanwhile, answers the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from typing import Protocol

from worker.errors import TransientDatabaseError
from worker.mappings import JobRecord

log = logging.getLogger(__name__)

#: Rows per INSERT: far below max_allowed_packet even with 1 KiB replies.
MAX_BATCH = 500


class JobStore(Protocol):
    async def record_jobs(self, records: list[JobRecord]) -> None: ...


class JobLedger:
    def __init__(self, store: JobStore, *, background_delay_s: float = 0.05) -> None:
        self._store = store
        self._delay_s = background_delay_s
        self._pending: list[tuple[JobRecord, asyncio.Future[None] | None]] = []
        self._writer: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False

    async def record(self, record: JobRecord) -> None:
        """Returns once the record is stored; raises what storing it raised."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((record, done))
        self._start_writer()
        await done

    def record_later(self, record: JobRecord) -> None:
        """Stores the record soon, in a batch with others; a failure is only logged."""
        self._pending.append((record, None))
        if self._timer is None and (self._writer is None or self._writer.done()):
            self._timer = asyncio.get_running_loop().call_later(self._delay_s, self._start_writer)

    async def close(self, timeout_s: float = 10.0) -> None:
        """Writes what is pending (at shutdown), giving up after `timeout_s`: a statement
        on a half-open connection would otherwise hold the shutdown forever."""
        self._closing = True
        self._start_writer()
        if self._writer is not None:
            with contextlib.suppress(Exception, TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._writer), timeout_s)
            if not self._writer.done():
                self._writer.cancel()
                await asyncio.wait({self._writer})  # its outcome is the waiters' business

    def _start_writer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._pending and (self._writer is None or self._writer.done()):
            # A context of its own: the job that happened to start the writer must not
            # lend its job_id to the writer's log lines.
            self._writer = asyncio.create_task(self._write(), context=contextvars.Context())

    async def _write(self) -> None:
        # Whatever arrives while one INSERT runs goes into the next one.
        batch: list[tuple[JobRecord, asyncio.Future[None] | None]] = []
        try:
            while self._pending:
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                try:
                    await self._store.record_jobs([record for record, _ in batch])
                except Exception as exc:
                    _settle(batch, exc)
                else:
                    _settle(batch, None)
                written, batch = len(batch), []
                if (
                    not self._closing
                    and written < MAX_BATCH  # a backlog drains back to back
                    and all(done is None for _, done in self._pending)
                ):
                    break  # nobody waits on what is left: let more gather, as record_later does
        except BaseException:
            # Cancelled (at shutdown): nobody may wait forever for a record.
            # Retryable: the job is requeued, and its next delivery finishes it.
            _settle(batch + self._pending, TransientDatabaseError("the job ledger stopped"))
            self._pending = []
            raise
        if self._pending:
            self._timer = asyncio.get_running_loop().call_later(self._delay_s, self._start_writer)


def _settle(
    batch: list[tuple[JobRecord, asyncio.Future[None] | None]], error: Exception | None
) -> None:
    for record, done in batch:
        if done is None:
            if error is not None:
                log.warning(
                    "Could not record a reused job job_id=%s error=%s", record.job_id, error
                )
        elif not done.done():
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)
