"""In-memory stand-ins for the flow's Protocols, for unit tests of the flow alone."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from worker.devices import Device
from worker.errors import DeviceInUse, FlushFailed, TransientDatabaseError
from worker.mappings import Claimed, CommittedExport, CommittedLookup, JobRecord, Lease, Mapping
from worker.messages import PrepareExport


class InMemoryMappings:
    """Implements flow.Mappings with the same uniqueness rules as the SQL schema."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, int], Mapping] = {}
        self.jobs: dict[str, JobRecord] = {}
        self.claims = 0
        #: When N > 0, the Nth set_flush_error from now raises TransientDatabaseError.
        self.fail_flush_error_writes = 0

    async def lookup(
        self, vm_id: str, disk_unit_number: int, job_id: str
    ) -> tuple[Mapping | None, JobRecord | None]:
        return self.rows.get((vm_id, disk_unit_number)), self.jobs.get(job_id)

    async def record_jobs(self, records: list[JobRecord]) -> None:
        for record in records:
            self.jobs.setdefault(record.job_id, record)

    async def find_active_by_device(self, device_id: str) -> Mapping | None:
        for row in self.rows.values():
            if row.is_active and row.device_id == device_id:
                return row
        return None

    async def committed_export(self, export_name: str) -> CommittedExport | None:
        for row in self.rows.values():
            if row.is_active and row.export_name == export_name:
                return CommittedExport(
                    device_path=row.device_path, client_addresses=row.client_addresses
                )
        return None

    async def set_client_addresses(
        self, vm_id: str, disk_unit_number: int, client_addresses: str
    ) -> None:
        row = self.rows.get((vm_id, disk_unit_number))
        if row is not None and row.is_active:
            self.rows[(vm_id, disk_unit_number)] = row.model_copy(
                update={"client_addresses": client_addresses}
            )

    async def deactivate(
        self, vm_id: str, disk_unit_number: int, job_id: str, *, flushed: bool
    ) -> Mapping | None:
        row = self.rows.get((vm_id, disk_unit_number))
        if row is None:
            return None
        action = "released-flushed" if flushed else "released"
        self.rows[(vm_id, disk_unit_number)] = row.model_copy(
            update={"status": "inactive", "last_job_id": job_id, "last_action": action}
        )
        return self.rows[(vm_id, disk_unit_number)]

    async def set_planned_bytes(self, vm_id: str, disk_unit_number: int, planned: int) -> None:
        row = self.rows.get((vm_id, disk_unit_number))
        if row is not None:
            self.rows[(vm_id, disk_unit_number)] = row.model_copy(update={"planned_bytes": planned})

    async def set_flush_error(
        self, vm_id: str, disk_unit_number: int, flush_error: str | None
    ) -> None:
        if self.fail_flush_error_writes:
            self.fail_flush_error_writes -= 1
            if not self.fail_flush_error_writes:
                raise TransientDatabaseError("the database went away")
        row = self.rows.get((vm_id, disk_unit_number))
        if row is not None:
            self.rows[(vm_id, disk_unit_number)] = row.model_copy(
                update={"flush_error": flush_error}
            )

    async def settle_answer(
        self, vm_id: str, disk_unit_number: int, job_id: str, last_action: str
    ) -> str | None:
        row = self.rows.get((vm_id, disk_unit_number))
        if row is None or row.last_job_id != job_id:
            return None
        if not (row.last_action or "").endswith("!"):
            row = row.model_copy(update={"last_action": last_action + "!"})
            self.rows[(vm_id, disk_unit_number)] = row
        return row.last_action

    async def restore(self, mapping: Mapping, claimed_device_id: str) -> bool:
        key = (mapping.vm_id, mapping.disk_unit_number)
        row = self.rows.get(key)
        if row is None or not row.is_active or row.device_id != claimed_device_id:
            return False
        holder = await self.find_active_by_device(mapping.device_id)
        if holder is not None and holder.id != mapping.id:
            return False
        self.rows[key] = mapping
        return True

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
    ) -> Claimed:
        key = (request.vm_id, request.disk_unit_number)
        device_id = device.device_id
        holder = await self.find_active_by_device(device_id)
        if holder is not None and (holder.vm_id, holder.disk_unit_number) != key:
            raise DeviceInUse(f"device {device.path} is served by {holder.export_name}")
        now = datetime.now(UTC)
        old = self.rows.get(key)
        self.rows[key] = Mapping(
            id=old.id if old else len(self.rows) + 1,
            node_id="n",
            vm_id=request.vm_id,
            disk_unit_number=request.disk_unit_number,
            vm_name=request.vm_name,
            export_name=request.export_name,
            device_path=device.path,
            device_id=device_id,
            status="active",
            created_at=old.created_at if old else now,
            updated_at=now,
            last_job_id=request.job_id,
            last_action=action,
            flush_error=None,  # a claim starts a new copy, as the SQL UPDATE does
            client_addresses=client_addresses,
            # As the SQL: an active row goes on with its copy, another starts a new one.
            planned_bytes=(
                request.planned_bytes or old.planned_bytes
                if old is not None and old.is_active
                else request.planned_bytes
            ),
            prepared_at=(
                old.prepared_at if old is not None and old.is_active and old.prepared_at else now
            ),
        )
        self.claims += 1
        lease = lease or Lease()
        row = self.rows[key]
        self.rows[key] = row.model_copy(
            update={
                "generation": max(old.generation if old is not None else 0, after)
                + (0 if resumes else 1),
                "lease_s": lease.lease_s,
                "idle_timeout_s": lease.idle_timeout_s,
                "lease_expires_at": _deadline(lease.lease_s),
                "fenced_at": None,
            }
        )
        return Claimed(self.rows[key].generation, self.rows[key].lease_expires_at)

    async def renew(
        self, vm_id: str, disk_unit_number: int, lease: Lease | None = None
    ) -> Claimed | None:
        row = self.rows.get((vm_id, disk_unit_number))
        if row is None or not row.is_active or (lease is None and row.fenced):
            return None
        update: dict[str, object] = {"lease_expires_at": _deadline(row.lease_s)}
        if lease is not None:
            update = {
                "generation": row.generation + 1,
                "lease_s": lease.lease_s,
                "idle_timeout_s": lease.idle_timeout_s,
                "lease_expires_at": _deadline(lease.lease_s),
            }
        row = row.model_copy(update=update)
        self.rows[(vm_id, disk_unit_number)] = row
        return Claimed(row.generation, row.lease_expires_at)

    async def fence(self, vm_id: str, disk_unit_number: int) -> None:
        row = self.rows.get((vm_id, disk_unit_number))
        if row is not None and row.is_active and not row.fenced:
            self.rows[(vm_id, disk_unit_number)] = row.model_copy(
                update={"fenced_at": datetime.now(UTC)}
            )

    async def unfence(self, vm_id: str, disk_unit_number: int) -> None:
        row = self.rows.get((vm_id, disk_unit_number))
        if row is not None:
            self.rows[(vm_id, disk_unit_number)] = row.model_copy(update={"fenced_at": None})


@dataclass(frozen=True)
class FakeEnsured:
    sighup_sent: bool
    changed: bool


class FakeExportServer:
    """Implements flow.ExportServer: exports are a dict, a reload is a counter."""

    def __init__(self) -> None:
        self.known: set[str] = set()
        self.links: dict[str, str] = {}
        self.sighups = 0
        self.ensure_calls = 0
        self.delay_s = 0.0
        self.probe_delay_s = 0.0
        self.fail_with: Exception | None = None
        #: Runs inside ensure_export before anything else (to stage a race).
        self.ensure_hook: Callable[[str], Awaitable[None]] | None = None
        #: (name, device_path) of every flush; flush_errors pops one errno per flush.
        self.flushed: list[tuple[str, str]] = []
        self.flush_errors: list[str] = []
        self.held: dict[str, str] = {}
        self.detached: set[str] = set()
        #: Where what an export is committed to is read (bound by the flow, as for NbdServer).
        self.committed: CommittedLookup | None = None
        #: name -> the addresses its authfile admits (None: nobody, released).
        self.authfiles: dict[str, tuple[str, ...] | None] = {}
        self.authfile_writes = 0

    tls = False

    def bind_committed(self, committed: CommittedLookup) -> None:
        self.committed = committed

    async def _committed(self, name: str) -> CommittedExport | None:
        assert self.committed is not None, "bind_committed() was not called"
        return await self.committed(name)

    def admits(self, name: str, client_addresses: tuple[str, ...]) -> bool:
        return self.authfiles.get(name) == client_addresses

    async def _write_authfile(self, name: str) -> CommittedExport | None:
        found = await self._committed(name)
        admitted = None
        if found is not None:
            admitted = found.admitted()
        if self.authfiles.get(name, ()) != admitted:
            self.authfiles[name] = admitted
            self.authfile_writes += 1
        return found

    async def align_export(self, name: str) -> CommittedExport | None:
        found = await self._write_authfile(name)
        if found is None:
            self.links.pop(name, None)
        else:
            self.links[name] = found.device_path
        return found

    async def is_live(self, name: str, device_path: str, *, fresh: bool = True) -> bool:
        live = name in self.known and self.links.get(name) == device_path
        await asyncio.sleep(self.probe_delay_s)  # the answer is as of the probe's start
        return live

    async def needs_reload(self, name: str) -> bool:
        return name not in self.known

    async def ensure_export(self, name: str, device_path: str) -> FakeEnsured:
        self.ensure_calls += 1
        await asyncio.sleep(self.delay_s)
        if self.ensure_hook is not None:
            await self.ensure_hook(name)
        if self.fail_with is not None:
            raise self.fail_with
        found = await self._write_authfile(name)
        target = found.device_path if found is not None else device_path
        changed = self.links.get(name) != target
        self.links[name] = target
        if name in self.known:
            return FakeEnsured(sighup_sent=False, changed=changed)
        self.sighups += 1
        self.known.add(name)
        return FakeEnsured(sighup_sent=True, changed=True)

    async def remove_export(self, name: str) -> bool:
        if await self._committed(name) is not None:
            return False
        await asyncio.sleep(self.delay_s)
        await self._write_authfile(name)
        self.links.pop(name, None)
        return True

    async def flush_export(self, name: str, device_path: str, device_id: str) -> None:
        if self.flush_errors:
            errno_name = self.flush_errors.pop(0)
            if errno_name == "ENOENT":  # the device is gone: nothing to fsync
                self.detached.add(device_path)
                raise FlushFailed(f"cannot open {device_path}", errno_name, device_gone=True)
            raise FlushFailed(f"fsync of {device_path} failed", errno_name, lost_writes=True)
        self.flushed.append((name, device_path))

    async def hold_device(self, name: str, device_path: str, device_id: str) -> None:
        self.held[name] = device_id

    def device_present(self, device_path: str) -> bool:
        return device_path not in self.detached


def _deadline(lease_s: int | None) -> datetime | None:
    return None if lease_s is None else datetime.now(UTC) + timedelta(seconds=lease_s)
