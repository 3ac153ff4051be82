"""The reuse-or-create flow: one prepare-export job in, one ExportReady out.

What a prepare-export needs is decided by worker/plan.py's pure plan(); this module finds
out the facts it asks for and carries the plan out, through two Protocols. It imports no
broker, database driver, subprocess or signal code (a unit test checks), so it runs the
same on fakes and real adapters.

Over 400 lines (budget 790) on purpose: the prepare, release (its modes), flush and inspect
paths sit beside each other because they must agree; they share the per-key locks, epochs,
generations and fences.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Protocol, TypeVar

from worker.after_reply import after_reply
from worker.devices import Device, DevicePolicy
from worker.errors import (
    ExportInUse,
    ExportNotFound,
    FlushFailed,
    InvalidRequest,
    StaleGeneration,
    Superseded,
    WorkerError,
)
from worker.faults import crash_point
from worker.keyed_locks import KeyedLocks
from worker.mappings import (
    Claimed,
    CommittedExport,
    CommittedLookup,
    JobRecord,
    Lease,
    Mapping,
)
from worker.messages import (
    AnyRequest,
    ChecksumExport,
    ChecksumProgress,
    ConnectionStatus,
    ExportFlushed,
    ExportLiveState,
    ExportReady,
    ExportReleased,
    ExportStatus,
    FlushExport,
    InspectExport,
    PrepareExport,
    ReleaseExport,
)
from worker.plan import REUSE_ANSWER, Answer, Ask, Claim, Fact, Facts, Plan, Repair, Reuse, plan
from worker.plan import decide as decide  # re-exported: its table is in tests/unit/test_flow.py

log = logging.getLogger(__name__)
#: A reply type a recorded job can be repeated as.
R = TypeVar("R", ExportReady, ExportReleased, ExportFlushed)
#: The flush_error column's width.
MAX_FLUSH_ERROR = 255
#: flush_error while an fsync runs: a crash, a cancellation or a lost database write before
#: its outcome is recorded leaves it, and later flushes then fail closed.
UNFINISHED = "UNFINISHED"
#: last_action of a release that fsynced the device first (older releases did not).
RELEASED_FLUSHED = "released-flushed"
RELEASED = "released"
#: Reuse answers kept for duplicates until their records are surely written.
ANSWERED_KEPT = 4096
#: How often a drain looks at the export's connections, and how long a cut connection's
#: process may take to end.
DRAIN_POLL_S = 0.2
CUT_WAIT_S = 5.0
#: How long a safe release waits for connections that are ending (their client gone)
#: before it refuses; nothing changes meanwhile.
SAFE_SETTLE_S = 1.0
#: How a kept fsync failure names its job and time, after its errno (flush_error).
_WHEN_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_WHEN_RE = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


class Mappings(Protocol):
    async def lookup(
        self, vm_id: str, disk_unit_number: int, job_id: str
    ) -> tuple[Mapping | None, JobRecord | None]: ...
    async def claim(
        self,
        request: PrepareExport,
        device: Device,
        action: str,
        client_addresses: str,
        lease: Lease | None = None,
        *,
        after: int = 0,
        resumes: bool = False,
    ) -> Claimed: ...
    async def renew(
        self, vm_id: str, disk_unit_number: int, lease: Lease | None = None
    ) -> Claimed | None: ...
    async def fence(self, vm_id: str, disk_unit_number: int) -> None: ...
    async def unfence(self, vm_id: str, disk_unit_number: int) -> None: ...
    async def restore(self, mapping: Mapping, claimed_device_id: str) -> bool: ...
    async def committed_export(self, export_name: str) -> CommittedExport | None: ...
    async def set_client_addresses(
        self, vm_id: str, disk_unit_number: int, client_addresses: str
    ) -> None: ...
    async def deactivate(
        self, vm_id: str, disk_unit_number: int, job_id: str, *, flushed: bool
    ) -> Mapping | None: ...
    async def set_flush_error(
        self, vm_id: str, disk_unit_number: int, flush_error: str | None
    ) -> None: ...
    async def settle_answer(
        self, vm_id: str, disk_unit_number: int, job_id: str, last_action: str
    ) -> str | None: ...
    async def set_planned_bytes(self, vm_id: str, disk_unit_number: int, planned: int) -> None: ...


class LiveStates(Protocol):
    async def current(self, export_name: str) -> ExportLiveState:
        """The export's live state from a sample taken now (or one under way). Raises
        WorkerError when the server cannot be sampled."""
        ...

    async def connections(self, export_name: str) -> list[ConnectionStatus]:
        """The export's connections open now. Raises WorkerError."""
        ...

    async def cut(self, export_name: str) -> int:
        """Ends the export's open connections and no others; how many. Raises WorkerError."""
        ...

    def changed(self, export_name: str, previous_device: str | None = None) -> None:
        """A claim made or moved the export (`previous_device`: what it opened before)."""
        ...


class Ledger(Protocol):
    async def record(self, record: JobRecord) -> None: ...
    def record_later(self, record: JobRecord) -> None: ...


class Ensured(Protocol):
    @property
    def changed(self) -> bool:
        """False when everything was in place already: another job or worker did it."""


class ExportServer(Protocol):
    @property
    def tls(self) -> bool:
        """Whether copy tools must connect with TLS (replies say so)."""
        ...

    def bind_committed(self, committed: CommittedLookup) -> None:
        """Where the server reads, under its lock, what the database commits an export to."""
        ...

    async def is_live(self, name: str, device_path: str, *, fresh: bool = True) -> bool: ...
    def admits(self, name: str, client_addresses: tuple[str, ...]) -> bool: ...
    async def needs_reload(self, name: str) -> bool: ...
    async def ensure_export(self, name: str, device_path: str) -> Ensured: ...
    async def align_export(self, name: str) -> CommittedExport | None: ...
    async def remove_export(self, name: str) -> bool: ...
    async def flush_export(self, name: str, device_path: str, device_id: str) -> None: ...
    async def hold_device(self, name: str, device_path: str, device_id: str) -> None: ...
    def device_present(self, device_path: str) -> bool: ...


def _record(reply: ExportReady | ExportReleased | ExportFlushed) -> JobRecord:
    # Built from a validated reply: nothing to validate again (a reuse makes one per job).
    return JobRecord.model_construct(
        job_id=reply.job_id,
        vm_id=reply.vm_id,
        disk_unit_number=reply.disk_unit_number,
        reply=reply.model_dump(mode="json"),
    )


def _check_generation(
    request: FlushExport | ReleaseExport | InspectExport | ChecksumExport,
    mapping: Mapping,
    issued: int,
) -> None:
    """Refuses a job that names an older generation than the export's (none: no check).
    A newer one is not refused: a reuse's generation whose record a crash lost."""
    current = max(mapping.generation, issued)
    if request.generation is not None and request.generation < current:
        raise StaleGeneration(mapping.export_name, request.generation, current)


def _kept_failure(job_id: str, when: str, exc: FlushFailed) -> str:
    """The flush_error an fsync failure keeps: its errno, its job and time, its message
    (cut to the column; the job's answer is what is kept, see _own_failure)."""
    return f"{exc.errno_name or 'error'}: job {job_id} at {when}: {exc}"[:MAX_FLUSH_ERROR]


def _own_failure(flush_error: str, job_id: str) -> FlushFailed | None:
    """The failure kept by `job_id`'s own fsync, to answer as it was answered; None when
    another job's flush (or none that finished) left `flush_error`."""
    found = re.fullmatch(
        rf"(\w+): job {re.escape(job_id)} at {_WHEN_RE}: (.*)", flush_error, flags=re.DOTALL
    )
    if found is None:
        return None
    errno_name = None if found[1] == "error" else found[1]
    return FlushFailed(found[2], errno_name, lost_writes=True)


class ExportFlow:
    def __init__(
        self,
        mappings: Mappings,
        server: ExportServer,
        devices: DevicePolicy,
        ledger: Ledger,
        *,
        nbd_host: str,
        nbd_port: int,
        node_id: str,
        client_addresses: tuple[str, ...],
        live: LiveStates | None = None,
        lease_s: int = 0,
        checksums: Callable[[str], ChecksumProgress | None] | None = None,
    ) -> None:
        self._mappings = mappings
        #: The checksum running on an export, for inspect-export (worker/checksums.py).
        self._checksums = checksums
        #: The live view inspect-export answers from (None: not sampled in this process).
        self._live = live
        #: The lease of a prepare-export that names none (0: none).
        self._lease_s = lease_s
        #: The last generation this process answered, by (vm, disk): a reuse's reaches the
        #: database with its record, a moment after its reply.
        self._issued: dict[tuple[str, int], int] = {}
        #: The last reuses' answers, by job_id: their records are written a moment later.
        self._answered: OrderedDict[str, ExportReady] = OrderedDict()
        self._server = server
        self._devices = devices
        self._ledger = ledger
        self._nbd_host = nbd_host
        self._nbd_port = nbd_port
        self._node_id = node_id
        #: Who may connect to an export whose job does not say.
        self._client_addresses = client_addresses
        # Jobs for one (vm, disk) run one at a time, so two of them make one create.
        self._keys = KeyedLocks()
        # The server reads what an export is committed to from these mappings, and only
        # from them: set once, here, where the two are paired.
        server.bind_committed(mappings.committed_export)

    def _admitted(self, request: PrepareExport) -> tuple[str, ...]:
        return request.client_addresses or self._client_addresses

    def _lease(self, request: PrepareExport) -> Lease:
        return Lease(request.lease_s or self._lease_s or None, request.idle_timeout_s)

    def _ready(
        self, request: PrepareExport, device: Device, step: Plan, claimed: Claimed
    ) -> ExportReady:
        return ExportReady(
            job_id=request.job_id,
            vm_id=request.vm_id,
            disk_unit_number=request.disk_unit_number,
            export_name=request.export_name,
            device_path=device.path,
            kernel_device=device.resolved,
            volume_id=request.volume_id,
            reused=step.answer.reused,
            action=step.answer.action,
            nbd_host=self._nbd_host,
            nbd_port=self._nbd_port,
            node_id=self._node_id,
            client_addresses=list(self._admitted(request)),
            tls=self._server.tls,
            generation=claimed.generation,
            lease_expires_at=claimed.lease_expires_at,
        )

    async def _plan(
        self, mapping: Mapping | None, request: PrepareExport, device: Device, *, fresh: bool
    ) -> Plan | Ask:
        """plan(), with each fact it asks for found out. `fresh=False` (the fast path,
        no lock): the server's side as remembered, and no question about a reload, which
        only a claim asks: then the Ask is returned."""
        facts = Facts(clients=self._admitted(request))
        while isinstance(step := plan(mapping, request, device, facts), Ask):
            if step.fact is Fact.LIVE:
                found = await self._server.is_live(request.export_name, device.path, fresh=fresh)
            elif step.fact is Fact.AUTHFILE_ADMITS:
                found = self._server.admits(request.export_name, facts.clients)
            elif fresh:
                found = not await self._server.needs_reload(request.export_name)
            else:
                return step
            facts = facts.learnt(step.fact, found)
        return step

    async def prepare_export(self, request: PrepareExport) -> ExportReady:
        """Serves one job. Raises WorkerError subclasses; retryable ones may be retried."""
        key = (request.vm_id, request.disk_unit_number)
        epoch = self._keys.epoch(key)
        mapping, recorded = await self._mappings.lookup(*key, request.job_id)
        if recorded is None and (answered := self._answered.get(request.job_id)) is not None:
            recorded = _record(answered)  # a reuse whose record is not written yet
        if recorded is not None:
            # Answered before (a redelivery, a duplicate): the same answer, whatever has
            # changed since, and nothing touched.
            return self._repeat(request, recorded, ExportReady)
        device = await self._devices.resolve(request.device_path, request.volume_id)
        # Fast path, no lock: the common case is a job for a disk already being served, and
        # then one database lookup, what is remembered of the server and one lstat (its
        # authfile, as last found right, admits the job's clients) are the plan's facts.
        # Only a plan with nothing to put right is answered here.
        step = await self._plan(mapping, request, device, fresh=False)
        if (
            isinstance(step, Reuse)
            and step.plain
            # A create, relink or release of this disk under way here, or done during the
            # awaits above, may have made what was read stale: then the locked path decides.
            and key not in self._keys
            and self._keys.epoch(key) == epoch
        ):
            return await self._reuse(request, device, step)

        async with self._keys.hold(key):
            # Read again under the lock: a job for the same disk (maybe this very one,
            # duplicated) may have finished while this one looked or waited.
            mapping, recorded = await self._mappings.lookup(*key, request.job_id)
            if recorded is not None:
                return self._repeat(request, recorded, ExportReady)
            step = await self._plan(mapping, request, device, fresh=True)
            assert not isinstance(step, Ask)  # every fact is found out with fresh=True
            if isinstance(step, Reuse):
                await self._repair(request, step)
                return await self._reuse(request, device, step)
            return await self._claim(request, device, step)

    async def _reuse(self, request: PrepareExport, device: Device, step: Reuse) -> ExportReady:
        # A dict lookup once held: a later flush-export then sees every writeback error.
        await self._server.hold_device(request.export_name, device.path, device.device_id)
        # The next generation: this job fences off older ones.
        key = (request.vm_id, request.disk_unit_number)
        lease = self._lease(request)
        if step.leased or lease != Lease():
            # The lease set anew, from the database's clock, before the answer says it.
            claimed = await self._mappings.renew(*key, lease)
            if claimed is None:  # released meanwhile: plan again
                raise Superseded(request.export_name)
        else:
            # No lease: the generation is written with the job's record, just after the
            # reply, as the record is (an fsync per reuse would double its latency); this
            # process answers from what it issued meanwhile (self._issued).
            claimed = Claimed(max(step.generation, self._issued.get(key, 0)) + 1, None)
        if (answered := self._answered.get(request.job_id)) is not None:
            # A duplicate of this job, served at the same time, answered first: the same.
            return self._repeat(request, _record(answered), ExportReady)
        self._issued[key] = max(claimed.generation, self._issued.get(key, 0))
        ready = self._ready(request, device, step, claimed)
        # A duplicate of this job arriving before its record is written answers the same
        # (its generation included).
        self._answered[request.job_id] = ready
        while len(self._answered) > ANSWERED_KEPT:
            self._answered.popitem(last=False)
        crash_point("reuse_before_record")

        def log_and_record() -> None:
            log.info(
                "Found existing VM export mapping - reuse without SIGHUP job_id=%s export_name=%s",
                request.job_id,
                request.export_name,
            )
            self._ledger.record_later(_record(ready))

        # Neither needs to delay the reply: a reuse changed nothing (worker/after_reply.py).
        after_reply(log_and_record)
        return ready

    async def _repair(self, request: PrepareExport, step: Reuse) -> None:
        """Puts right what a reuse needs first; the caller holds the disk's lock."""
        name, key = request.export_name, (request.vm_id, request.disk_unit_number)
        if Repair.UNFENCE in step.repairs:
            # A drain or an expiry had it admit nobody: this job wants it served again.
            await self._mappings.unfence(*key)
        if Repair.CLEAR_FLUSH_ERROR in step.repairs:
            await self._mappings.set_flush_error(*key, None)
        if Repair.STORE_CLIENTS in step.repairs:
            await self._mappings.set_client_addresses(*key, step.clients)
        if Repair.STORE_PLANNED_BYTES in step.repairs and request.planned_bytes is not None:
            await self._mappings.set_planned_bytes(*key, request.planned_bytes)
        if Repair.ALIGN_AUTHFILE in step.repairs:
            # Takes effect on the next connection: the server reads it every time.
            found = await self._server.align_export(name)
            if found is None or found.client_addresses != step.clients or found.fenced:
                raise Superseded(name)
            log.info(
                "Export admits other clients now, without SIGHUP job_id=%s "
                "export_name=%s client_addresses=%s",
                request.job_id,
                name,
                ",".join(self._admitted(request)),
            )

    async def _claim(self, request: PrepareExport, device: Device, step: Claim) -> ExportReady:
        """Claims the row, makes the export serve, records the answer; the caller holds the
        disk's lock."""
        name = request.export_name
        if not step.resumes:
            log.info(
                "Creating new VM export mapping job_id=%s export_name=%s action=%s device_path=%s",
                request.job_id,
                name,
                step.answer.action,
                device.path,
            )
        # The database row first: its unique device index settles races with other jobs
        # and workers before anything on disk or in the server changes (DeviceInUse). The
        # answer goes with it, so that every delivery of this job says the same.
        key = (request.vm_id, request.disk_unit_number)
        claimed = await self._mappings.claim(
            request,
            device,
            step.answer.recorded,
            step.clients,
            self._lease(request),
            after=self._issued.get(key, 0),
            resumes=step.resumes,
        )
        self._issued[key] = max(claimed.generation, self._issued.get(key, 0))
        if self._live is not None:
            self._live.changed(name, step.restore.device_path if step.restore else None)
        crash_point("after_claim")
        try:
            ensured = await self._server.ensure_export(name, device.path)
        except Superseded:
            raise  # a newer job owns the row now: nothing of ours to undo
        except WorkerError:
            if step.restore is not None:
                await self._undo_relink(step.restore, device.device_id)
            raise
        if self._live is not None and ensured.changed:
            self._live.changed(name)  # the link is written: the view reads it again
        proposed = step.answer
        if not ensured.changed and not step.resumes:
            # Everything was in place already: a job for this disk on another worker made
            # it while this one planned (this worker's jobs for a disk take turns). Nothing
            # was done for this job: a reuse.
            proposed = REUSE_ANSWER
        # The answer is settled once, in the row: the same job delivered to two workers at
        # once (a redelivery racing its first delivery) could otherwise answer twice,
        # unalike (one "reused", found in place; one "created", resuming the claim).
        settled = await self._mappings.settle_answer(
            request.vm_id, request.disk_unit_number, request.job_id, proposed.recorded
        )
        if settled is not None:
            step = replace(step, answer=Answer.of_recorded(settled))
        ready = self._ready(request, device, step, claimed)
        await self._server.hold_device(name, device.path, device.device_id)
        crash_point("before_record")
        # Durable before the reply: a redelivery of this job must repeat this answer.
        await self._ledger.record(_record(ready))
        return ready

    def _repeat(self, request: AnyRequest, recorded: JobRecord, reply_type: type[R]) -> R:
        """The answer this job got before. A job_id already used for another disk, or for
        another kind of job, is refused: a new job needs a new job_id."""
        same_kind = recorded.reply.get("status") == reply_type.model_fields["status"].default
        if not (same_kind and recorded.is_for(request.vm_id, request.disk_unit_number)):
            raise InvalidRequest(
                f"job_id {request.job_id} was already used for another job (vm "
                f"{recorded.vm_id} disk {recorded.disk_unit_number}); a new job needs a new "
                "job_id"
            )
        log.info(
            "Job answered before; repeating its reply job_id=%s export_name=%s",
            request.job_id,
            request.export_name,
        )
        return reply_type.model_validate(recorded.reply)

    async def _flush(self, mapping: Mapping, job_id: str) -> None:
        """fsyncs the mapping's device through its export. Raises FlushFailed.

        Linux reports a writeback error once per open file, so a later fsync may succeed
        although the data is lost: a failed fsync is kept on the mapping, and so is a flush
        whose outcome was never recorded (a crash, a cancellation, the database away: the
        UNFINISHED mark written before the fsync stays). Until a new prepare-export starts a
        new copy, every flush of this mapping then fails the same way."""
        name, key = mapping.export_name, (mapping.vm_id, mapping.disk_unit_number)
        if mapping.flush_error is not None:
            own = _own_failure(mapping.flush_error, job_id)
            if own is not None:
                # This job's fsync failed, and the answer was lost (a crash, a lost
                # connection): the same answer again.
                raise own
            cause, _, _ = mapping.flush_error.partition(":")
            raise FlushFailed(
                f"an earlier flush of {name} failed or did not finish ({mapping.flush_error}): "
                "what was written before it may not be on the volume. Send prepare-export "
                "again and copy the disk again",
                errno_name=None if cause == UNFINISHED else cause,
                lost_writes=True,
            )
        when = datetime.now(UTC).strftime(_WHEN_FORMAT)
        await self._mappings.set_flush_error(
            *key, f"{UNFINISHED}: a flush by job {job_id} at {when} did not finish"
        )
        try:
            await self._server.flush_export(name, mapping.device_path, mapping.device_id)
        except FlushFailed as exc:
            # Kept only when an fsync itself failed; a device or link that could not be
            # opened lost nothing yet.
            if not exc.lost_writes:
                await self._mappings.set_flush_error(*key, None)
                raise
            kept = _kept_failure(job_id, when, exc)
            await self._mappings.set_flush_error(*key, kept)
            crash_point("flush_failure_kept")
            # Answered as kept, so that a redelivery of this job answers the same.
            raise _own_failure(kept, job_id) or exc from exc
        await self._mappings.set_flush_error(*key, None)

    async def flush_export(self, request: FlushExport) -> ExportFlushed:
        """Makes everything written through the (VM, disk)'s export durable: fsync of its
        device, opened through the export's link. Changes nothing else."""
        key = (request.vm_id, request.disk_unit_number)
        async with self._keys.hold(key):
            mapping, recorded = await self._mappings.lookup(*key, request.job_id)
            if recorded is not None:
                return self._repeat(request, recorded, ExportFlushed)
            if mapping is None or not mapping.is_active:
                raise ExportNotFound(
                    f"no active export for vm {request.vm_id} disk {request.disk_unit_number} "
                    "on this node: nothing to flush"
                )
            _check_generation(request, mapping, self._issued.get(key, 0))
            await self._flush(mapping, request.job_id)
            if mapping.lease_s is not None:
                await self._mappings.renew(*key)  # a flush renews the lease
            log.info(
                "Flushed export job_id=%s export_name=%s device_path=%s",
                request.job_id,
                request.export_name,
                mapping.device_path,
            )
            flushed = ExportFlushed(
                job_id=request.job_id,
                vm_id=request.vm_id,
                disk_unit_number=request.disk_unit_number,
                export_name=request.export_name,
                device_path=mapping.device_path,
                node_id=self._node_id,
            )
            crash_point("flush_before_record")
            await self._ledger.record(_record(flushed))
            return flushed

    async def flush_for_checksum(self, request: ChecksumExport) -> Mapping:
        """flush-export's path without its reply or record, for a job that reads the device
        once it is flushed: the active mapping. Raises as flush_export does."""
        key = (request.vm_id, request.disk_unit_number)
        async with self._keys.hold(key):
            mapping, _ = await self._mappings.lookup(*key, request.job_id)
            if mapping is None or not mapping.is_active:
                raise ExportNotFound(
                    f"no active export for vm {request.vm_id} disk {request.disk_unit_number} "
                    "on this node: nothing to hash"
                )
            _check_generation(request, mapping, self._issued.get(key, 0))
            await self._flush(mapping, request.job_id)
            return mapping

    async def inspect_export(self, request: InspectExport) -> ExportStatus:
        """The (VM, disk)'s mapping and, while its export is active, its live state from a
        fresh sample. Changes nothing, takes no lock, records nothing: asking again gives
        the state then."""
        key = (request.vm_id, request.disk_unit_number)
        mapping, _ = await self._mappings.lookup(*key, request.job_id)
        if mapping is not None and mapping.is_active:
            _check_generation(request, mapping, self._issued.get(key, 0))
        lease_expires_at = mapping.lease_expires_at if mapping is not None else None
        if request.renew and mapping is not None and mapping.is_active:
            renewed = await self._mappings.renew(*key)
            if renewed is not None:
                lease_expires_at = renewed.lease_expires_at
        status = ExportStatus(
            job_id=request.job_id,
            vm_id=request.vm_id,
            disk_unit_number=request.disk_unit_number,
            export_name=request.export_name,
            node_id=self._node_id,
            export_status=(
                "unknown" if mapping is None else "active" if mapping.is_active else "released"
            ),
        )
        if mapping is None:
            return status
        live, live_error = None, None
        if mapping.is_active and self._live is not None:
            try:
                live = await self._live.current(request.export_name)
            except WorkerError as exc:
                live_error = str(exc)
        return status.model_copy(
            update={
                "device_path": mapping.device_path,
                "client_addresses": list(mapping.admitted(self._client_addresses)),
                "tls": self._server.tls,
                "flush_error": mapping.flush_error,
                "live": live,
                "live_error": live_error,
                "generation": max(mapping.generation, self._issued.get(key, 0)),
                "lease_expires_at": lease_expires_at if mapping.is_active else None,
                "fenced": mapping.is_active and mapping.fenced,
                "checksum": self._checksums(request.export_name) if self._checksums else None,
            }
        )

    async def release_export(self, request: ReleaseExport) -> ExportReleased:
        """fsyncs the export's device, marks the mapping inactive, then removes its link and
        snippet: new connections fail at once, established ones keep their device, and the
        server forgets the name at its next restart. Releasing twice, or what was never
        prepared, is no error. A failed fsync (FlushFailed) leaves the export as it was."""
        key = (request.vm_id, request.disk_unit_number)
        async with self._keys.hold(key):
            mapping, recorded = await self._mappings.lookup(*key, request.job_id)
            if recorded is not None:
                return self._repeat(request, recorded, ExportReleased)
            # An earlier delivery of this job deactivated the row, then was cut short.
            earlier = (
                mapping is not None
                and mapping.last_job_id == request.job_id
                and mapping.last_action in (RELEASED, RELEASED_FLUSHED)
            )
            was_active = earlier or (mapping is not None and mapping.is_active)
            flushed = earlier and mapping is not None and mapping.last_action == RELEASED_FLUSHED
            cut = 0
            if mapping is not None and mapping.is_active:
                _check_generation(request, mapping, self._issued.get(key, 0))
                # Nobody connected any more before the final flush, so that it covers every
                # write: fence, then drain or cut, then flush, then remove.
                cut = await self._clear_connections(request, mapping)
                # Durable before anything changes: a copy tool's last writes may still be in
                # the page cache, and nbd-server never fsyncs on disconnect.
                try:
                    await self._flush(mapping, request.job_id)
                    flushed = True
                except FlushFailed as exc:
                    gone = exc.device_gone or not self._server.device_present(mapping.device_path)
                    if not gone:
                        raise
                    # Detached: nothing can be flushed any more (also after a kept failure,
                    # already reported), and serving it is moot.
                    log.warning(
                        "Releasing an export whose device is gone; not flushed "
                        "job_id=%s export_name=%s error=%s",
                        request.job_id,
                        request.export_name,
                        exc,
                    )
                # The row first: should the files' removal fail, reconciliation removes the
                # files of inactive mappings; the other order could bring a released export
                # back.
                await self._mappings.deactivate(*key, request.job_id, flushed=flushed)
            await self._server.remove_export(request.export_name)
            log.info(
                "Released VM export mapping job_id=%s export_name=%s was_active=%s",
                request.job_id,
                request.export_name,
                was_active,
            )
            released = ExportReleased(
                job_id=request.job_id,
                vm_id=request.vm_id,
                disk_unit_number=request.disk_unit_number,
                export_name=request.export_name,
                was_active=was_active,
                flushed=flushed,
                node_id=self._node_id,
                mode=request.mode,
                cut=cut,
            )
            crash_point("release_before_record")
            await self._ledger.record(_record(released))
            return released

    async def fence_export(self, vm_id: str, disk_unit_number: int, generation: int) -> bool:
        """Fences the (VM, disk)'s export (an expiry): whether it is fenced now; False when
        it is no longer active at `generation` (released, or prepared again since)."""
        key = (vm_id, disk_unit_number)
        async with self._keys.hold(key):
            mapping, _ = await self._mappings.lookup(*key, "")
            current = max(mapping.generation, self._issued.get(key, 0)) if mapping else 0
            if mapping is None or not mapping.is_active or current != generation:
                return False
            if not mapping.fenced:
                await self._fence(mapping)
            return True

    async def _fence(self, mapping: Mapping) -> None:
        """The export admits nobody from now on (its row first, then its authfile from it:
        nbd-server reads the authfile at every connection). Established connections go on."""
        await self._mappings.fence(mapping.vm_id, mapping.disk_unit_number)
        found = await self._server.align_export(mapping.export_name)
        if found is None or not found.fenced:
            raise Superseded(mapping.export_name)

    async def _unfence(self, mapping: Mapping) -> None:
        await self._mappings.unfence(mapping.vm_id, mapping.disk_unit_number)
        await self._server.align_export(mapping.export_name)

    async def _closed(self, name: str, wait_s: float) -> list[ConnectionStatus]:
        """The export's connections still open after waiting up to `wait_s` for them to
        end ([] as soon as none is)."""
        assert self._live is not None
        deadline = asyncio.get_running_loop().time() + wait_s
        while True:
            still = await self._live.connections(name)
            if not still or asyncio.get_running_loop().time() >= deadline:
                return still
            await asyncio.sleep(min(DRAIN_POLL_S, wait_s))

    async def _clear_connections(self, request: ReleaseExport, mapping: Mapping) -> int:
        """What the release's mode does about open connections; how many it cut. Raises
        ExportInUse (safe: nothing changed; drain: still fenced) and WorkerError when the
        server's connections cannot be seen (never a release on a guess)."""
        name = request.export_name
        if self._live is None:
            return 0  # no live view in this process (the flow's unit tests)
        if request.mode == "safe":
            # A copy tool that exited just before the release: its connection's server
            # process ends moments after it, so a release sent at once would be refused.
            still = await self._closed(name, SAFE_SETTLE_S)
            if not still:
                # Fenced, then looked at again: a client that connected in between is seen.
                await self._fence(mapping)
                still = await self._live.connections(name)
                if still:
                    await self._unfence(mapping)
            if still:
                raise ExportInUse(
                    f"export {name} has {len(still)} connection(s) open: nothing was "
                    "released; release again once the copy ended, or with mode drain or force",
                    still,
                )
            return 0
        await self._fence(mapping)
        cut = 0
        if request.mode == "force":
            cut = await self._live.cut(name)
            still = await self._closed(name, CUT_WAIT_S)
        else:
            still = await self._closed(name, request.wait_s)
        if still:
            raise ExportInUse(
                f"export {name} still has {len(still)} connection(s) open after "
                f"{CUT_WAIT_S if request.mode == 'force' else request.wait_s:g} s: it admits "
                "no new connection now (fenced) but was not released; release again",
                still,
            )
        return cut

    async def _undo_relink(self, previous: Mapping, claimed_device_id: str) -> None:
        """After a failed relink, makes the link and authfile agree with the row again, so
        no row frees a device that the export's link still opens: back on the old device
        if the row could be restored, else on whatever the row now commits the export to
        (or removed, if nothing)."""
        try:
            await self._mappings.restore(previous, claimed_device_id)
            await self._server.align_export(previous.export_name)
        except WorkerError as exc:
            log.warning(
                "Could not undo a failed relink; reconciliation will align it "
                "export_name=%s error=%s",
                previous.export_name,
                exc,
            )
