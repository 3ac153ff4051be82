"""The Mapping record: one row of vm_export_mappings, as the flow and the repository see it.

Kept apart from repository.py so the flow can use it without importing the database driver.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict

from worker.access import normalize_client_addresses

if TYPE_CHECKING:
    from worker.messages import ChecksumExport


class Mapping(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: int
    node_id: str
    vm_id: str
    disk_unit_number: int
    vm_name: str
    export_name: str
    device_path: str
    device_id: str
    status: Literal["active", "inactive"]
    #: Not read on the job path (the lookup leaves them out: every column costs it).
    created_at: datetime | None = None
    updated_at: datetime | None = None
    #: The job that last claimed or released this mapping, and what it did: the answer its
    #: claim settled (an Action value, "+reused" appended when the reply says reused), or
    #: "released" ("released-flushed"): lets that job, redelivered after a crash, answer as
    #: its first delivery would have.
    last_job_id: str | None = None
    last_action: str | None = None
    #: Why fsync of the device failed ("EIO: ..."), kept until a new prepare-export: what
    #: was written before may be lost, so no flush may claim durability meanwhile.
    flush_error: str | None = None
    #: Who may connect, as stored (normalized, comma-separated). The column is NULL on rows
    #: from before exports had access control, which admit the worker's default: the
    #: repository gives those rows that default (resolve_stored), so rows it returns never
    #: hold None here.
    client_addresses: str | None = None
    #: What the scheduler plans to write through the export (progress), if it said.
    planned_bytes: int | None = None
    #: When the copy was prepared: a create (not a recreate or relink). Not on the lookup.
    prepared_at: datetime | None = None
    #: Grows with every successful prepare-export: jobs naming an older one are refused.
    generation: int = 0
    #: The lease: its length (renewals add it again), its deadline (the database's clock).
    lease_s: int | None = None
    lease_expires_at: datetime | None = None
    idle_timeout_s: int | None = None
    #: Set while a drain or an expiry has the export admit nobody.
    fenced_at: datetime | None = None

    @property
    def fenced(self) -> bool:
        return self.fenced_at is not None

    @property
    def is_active(self) -> bool:
        return self.status == "active"

    def admitted(self, default: tuple[str, ...] | None = None) -> tuple[str, ...]:
        return admitted_addresses(self.client_addresses, default)


#: Every Mapping field in declaration order, at its default (None where it has none).
_MAPPING_TEMPLATE = {
    name: None if field.is_required() else field.default
    for name, field in Mapping.model_fields.items()
}


def mapping_of_row(fields: dict[str, Any]) -> Mapping:
    """Mapping.model_construct(**fields) (no validation: the columns' SQL types already
    are the fields' types) at a quarter of its cost, which walks every field's default and
    alias on each of a reuse's lookups. It sets what model_construct sets (a unit test
    compares the two); `fields` must hold every required field."""
    mapping = Mapping.__new__(Mapping)
    values = _MAPPING_TEMPLATE.copy()
    values.update(fields)
    object.__setattr__(mapping, "__dict__", values)
    object.__setattr__(mapping, "__pydantic_fields_set__", set(fields))
    object.__setattr__(mapping, "__pydantic_extra__", None)
    object.__setattr__(mapping, "__pydantic_private__", None)
    return mapping


def admitted_addresses(
    stored: str | None, default: tuple[str, ...] | None = None
) -> tuple[str, ...]:
    """The addresses a row's client_addresses column admits, re-validated: nothing
    unvalidated from the database reaches an authfile. Raises ValueError on a corrupt
    value, and on None unless a `default` is given (the repository resolves NULL, so
    None is a row it did not read: never guess who may connect)."""
    if stored is None:
        if default is None:
            raise ValueError("no client_addresses (a row the repository did not resolve)")
        return default
    return normalize_client_addresses(stored.split(","))


def resolve_stored(stored: str | None, default: str) -> str:
    """A row's client_addresses column as the worker reads it: NULL (a row from before
    access control) is `default`, the worker's default as stored."""
    return default if stored is None else stored


def stored_addresses(addresses: tuple[str, ...]) -> str:
    """How a normalized address list is kept in the client_addresses column."""
    return ",".join(addresses)


@dataclass(frozen=True)
class Lease:
    """What a prepare-export asks of its export's lease (None: no lease, no idle timeout)."""

    lease_s: int | None = None
    idle_timeout_s: int | None = None

    @property
    def deadline(self) -> tuple[int | None, int | None]:
        """The parameters of the repository's deadline expression."""
        return (self.lease_s, self.lease_s)


@dataclass(frozen=True)
class OutboxEvent:
    """A lease event in the outbox (export_events): its body is the export-event's JSON."""

    export_name: str
    kind: str
    ref: str
    body: str
    ready: bool


@dataclass(frozen=True)
class ChecksumJob:
    """A checksum-export accepted and not yet answered (export_checksums): what to hash,
    where to reply, and the reply once hashed (JSON; None while it runs)."""

    job_id: str
    vm_id: str
    disk_unit_number: int
    device_path: str
    device_id: str
    algorithm: str
    block_size: int
    reply_to: str | None
    correlation_id: str | None
    reply: str | None = None

    @classmethod
    def of(
        cls,
        request: ChecksumExport,
        mapping: Mapping,
        reply_to: str | None,
        correlation_id: str | None,
    ) -> ChecksumJob:
        """The job accepted for `request` on the active `mapping`: its device, as found."""
        return cls(
            job_id=request.job_id,
            vm_id=request.vm_id,
            disk_unit_number=request.disk_unit_number,
            device_path=mapping.device_path,
            device_id=mapping.device_id,
            algorithm=request.algorithm,
            block_size=request.block_size,
            reply_to=reply_to,
            correlation_id=correlation_id,
        )


@dataclass(frozen=True)
class Claimed:
    """A claimed or renewed export's generation and lease deadline (the database's clock)."""

    generation: int
    lease_expires_at: datetime | None


class CommittedExport(BaseModel):
    """What an active mapping commits its export to, read under the config lock."""

    model_config = ConfigDict(frozen=True)

    device_path: str
    #: As stored (see Mapping.client_addresses).
    client_addresses: str | None
    #: A drain or an expiry is under way: nobody may open the export (its authfile is empty).
    fenced: bool = False

    def admitted(self, default: tuple[str, ...] | None = None) -> tuple[str, ...]:
        return admitted_addresses(self.client_addresses, default)

    def doors(self) -> tuple[str, ...] | None:
        """Who its authfile admits: its clients, or nobody (None) while it is fenced.
        Raises ValueError on a corrupt client_addresses column."""
        return None if self.fenced else self.admitted()


#: Looks up, in the database, what an export (by name) is committed to (None: not active):
#: Repository.committed_export, bound to the NbdServer by whoever pairs the two.
CommittedLookup = Callable[[str], Awaitable[CommittedExport | None]]


class JobRecord(BaseModel):
    """A job the worker has answered: its reply, as published, in export_jobs."""

    model_config = ConfigDict(frozen=True)

    job_id: str
    vm_id: str
    disk_unit_number: int
    reply: dict[str, Any]

    def is_for(self, vm_id: str, disk_unit_number: int) -> bool:
        return self.vm_id == vm_id and self.disk_unit_number == disk_unit_number
