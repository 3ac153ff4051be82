"""The message contract: the jobs (prepare, release, flush, inspect, checksum), their
replies, and the export events.

Field names are the contract with the schedulers (and the SQL columns): never rename them.
Everything here is pure; these models are the only gate between a message and the worker.

Over 400 lines (budget 760) on purpose: the whole contract in one file, from which every
JSON Schema in schema/messages/ is generated.
"""

from __future__ import annotations

import json
import posixpath
import re
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Final, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    TypeAdapter,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaMode

from worker.access import ADDRESS_PATTERN, MAX_CLIENT_ADDRESSES, normalize_client_addresses

#: 8-4-4-4-12 hex digits, any variant: VMware's BIOS UUIDs are not RFC 4122 UUIDs.
VM_ID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
JOB_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
#: Characters a device path may use: what udev puts in /dev/disk/by-*/ names, nothing a
#: shell, an INI parser or a terminal would read specially.
DEVICE_PATH_PATTERN = r"^/[A-Za-z0-9._:+@,=/-]{1,1023}$"
MAX_DISK_UNIT_NUMBER = 255
#: 1 EiB: far beyond any disk, well inside the BIGINT column and a JSON number's exact range.
MAX_PLANNED_BYTES = 2**60
#: A lease and an idle timeout: at least 5 s (the expiry runs every 2 s), at most 7 days.
MIN_LEASE_S = 5
MAX_LEASE_S = 7 * 24 * 3600
#: How long a drain release may wait for the clients to leave (within a consumer timeout).
MAX_DRAIN_WAIT_S = 600
MAX_GENERATION = 2**62

JobId = Annotated[str, StringConstraints(pattern=JOB_ID_PATTERN)]
VmId = Annotated[str, StringConstraints(pattern=VM_ID_PATTERN, to_lower=True)]
#: A CloudStack volume UUID: 32 hex digits in 8-4-4-4-12 groups; stored lower-case.
VolumeId = Annotated[str, StringConstraints(pattern=VM_ID_PATTERN, to_lower=True)]
DiskUnitNumber = Annotated[int, Field(ge=0, le=MAX_DISK_UNIT_NUMBER, strict=True)]
ClientAddress = Annotated[str, StringConstraints(pattern=ADDRESS_PATTERN)]

_JOB_ID_RE = re.compile(JOB_ID_PATTERN)
_DEVICE_PATH_RE = re.compile(DEVICE_PATH_PATTERN)


def export_name(vm_id: str, disk_unit_number: int) -> str:
    """The export's name on the server: fixed by the contract, derived only from validated ids."""
    return f"migration-vm-{vm_id.lower()}-disk{disk_unit_number}"


class Action(StrEnum):
    """What the worker did to serve a job."""

    REUSED = "reused"
    """The mapping's export was live with the right device: nothing changed."""
    CREATED = "created"
    """No active mapping: a new snippet and mapping."""
    RECREATED = "recreated"
    """An active mapping whose export was not live (e.g. the server restarted): restored."""
    RELINKED = "relinked"
    """An active mapping with another device: its link now points at the job's device."""


class ErrorCode(StrEnum):
    INVALID_REQUEST = "invalid_request"
    DEVICE_NOT_FOUND = "device_not_found"
    DEVICE_IN_USE = "device_in_use"
    NBD_SERVER_UNAVAILABLE = "nbd_server_unavailable"
    NBD_SERVER_MISCONFIGURED = "nbd_server_misconfigured"
    """The running nbd-server's config cannot serve the worker's exports (another `-C` than
    the pinned one, or an `includedir` that is not the worker's snippet directory). Not
    retried: the job is answered at once; send it again once an operator fixed it (`check`
    names the problem)."""
    EXPORT_NOT_VISIBLE = "export_not_visible"
    DATABASE_UNAVAILABLE = "database_unavailable"
    INTERNAL_ERROR = "internal_error"
    FLUSH_FAILED = "flush_failed"
    """The export's device could not be made durable (`errno` names why): the data may not
    be on the volume. The export keeps serving. A failed fsync is kept: later flushes fail
    too until a new prepare-export starts a new copy; a device or link that could not be
    opened is not kept (send the job again once it is fixed)."""
    EXPORT_NOT_FOUND = "export_not_found"
    """No active export for this (VM, disk) on this node: nothing to flush."""
    EXPORT_IN_USE = "export_in_use"
    """release-export: connections are open (listed in `error.connections`); nothing was
    released. A normal answer, not a failure: release again later, or with mode drain or
    force. Acked."""
    STALE_GENERATION = "stale_generation"
    """The job's `generation` is older than the export's current one: a later prepare-export
    took the export over (a late message from a scheduler that gave it up). Nothing
    changed."""
    RESTART_REQUIRED = "restart_required"
    """The server serves the export otherwise than its config says; a reload cannot fix it."""
    SUPERSEDED = "superseded"
    """Another job changed the export while this one waited (retried; a `cause`)."""
    CONFIG_WRITE_FAILED = "config_write_failed"
    """A snippet, link or authfile could not be written (retried; a `cause`)."""
    DATABASE_ERROR = "database_error"
    """The database refused a statement, or a session that TLS requires is plaintext."""
    EXPORT_CHANGED = "export_changed"
    """checksum-export: the export was released or relinked while its checksum ran, so no
    checksum of what it serves could be given. Not retried; send the job again (a new
    job_id) if the export still matters."""
    RETRIES_EXHAUSTED = "retries_exhausted"
    """A transient failure outlasted every retry and delivery; `cause` says which. The
    job is kept, intact, in the dead-letter queue."""


class PrepareExport(BaseModel):
    """A scheduler's request: serve one disk of one VM as an NBD export."""

    model_config = ConfigDict(
        extra="ignore",
        frozen=True,
        # Exactly one of the two, given and not null.
        json_schema_extra={
            "oneOf": [
                {"required": ["device_path"], "properties": {"device_path": {"type": "string"}}},
                {"required": ["volume_id"], "properties": {"volume_id": {"type": "string"}}},
            ]
        },
    )

    type: Literal["prepare-export"] = Field(
        default="prepare-export", description="Optional; the default message type."
    )
    job_id: JobId = Field(description="The scheduler's id for this job.", examples=["job-42"])
    vm_id: VmId = Field(
        description="VMware VM UUID; stored lower-case.",
        examples=["4205784a-098a-40f1-1f1e-a5cd2597fd59"],
    )
    vm_name: str = Field(min_length=1, max_length=255, examples=["pgtest2"])
    disk_unit_number: DiskUnitNumber = Field(examples=[0])
    device_path: str | None = Field(
        default=None,
        pattern=DEVICE_PATH_PATTERN,
        description="Absolute, normalized path of the target block device, under an allowed "
        "root; /dev/disk/by-id/ names are stable across re-attach, /dev/vdX names are not. "
        "Exactly one of device_path and volume_id.",
        examples=["/dev/disk/by-id/virtio-0a1b2c3d4e5f6a7b8c9d"],
    )
    volume_id: VolumeId | None = Field(
        default=None,
        description="CloudStack volume UUID of the target disk; the worker finds its "
        "/dev/disk/by-id/virtio-<serial> (or scsi-0QEMU_QEMU_HARDDISK_<serial>) link. "
        "Exactly one of device_path and volume_id.",
        examples=["0a1b2c3d-4e5f-6a7b-8c9d-0e1f2a3b4c5d"],
    )
    client_addresses: tuple[ClientAddress, ...] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_CLIENT_ADDRESSES,
        description="Who may connect to the export: 1-16 numeric IPv4/IPv6 addresses or CIDR "
        "networks (no hostnames, no zone ids; a network's host bits must be zero). Default: "
        "the worker's EXPORT_WORKER_CLIENT_ADDRESSES. A job for a served disk with other "
        "addresses switches it over, at once and without a reload.",
        examples=[["10.0.0.7", "fd00:1::/64"]],
    )
    planned_bytes: int | None = Field(
        default=None,
        ge=1,
        le=MAX_PLANNED_BYTES,
        strict=True,
        description="How many bytes of data the scheduler intends to write through the export "
        "(e.g. the source's allocated size): export-status then carries `progress`. Optional; "
        "without it no progress figure is given. A later prepare-export may change it.",
        examples=[536870912],
    )
    lease_s: int | None = Field(
        default=None,
        ge=MIN_LEASE_S,
        le=MAX_LEASE_S,
        strict=True,
        description=f"Seconds ({MIN_LEASE_S} to {MAX_LEASE_S}) the export stays without being "
        "renewed (by prepare-export again, flush-export, or inspect-export with renew): then "
        "it is fenced, flushed and released. Default: EXPORT_WORKER_LEASE_S (0: no lease).",
        examples=[600],
    )
    idle_timeout_s: int | None = Field(
        default=None,
        ge=MIN_LEASE_S,
        le=MAX_LEASE_S,
        strict=True,
        description="Also expire the export once it had no connection and no I/O for this "
        "long. Off by default (warm migrations leave exports idle for hours between passes).",
        examples=[3600],
    )

    @field_validator("client_addresses", mode="before")
    @classmethod
    def _normalized_addresses(cls, value: object) -> object:
        if value is None:
            return None
        if not isinstance(value, list | tuple):
            raise ValueError("client_addresses must be a list of addresses")  # noqa: TRY004
        return normalize_client_addresses(value)

    @field_validator("vm_name")
    @classmethod
    def _printable(cls, value: str) -> str:
        if not value.isprintable():
            raise ValueError("vm_name must contain printable characters only")
        return value

    @field_validator("device_path")
    @classmethod
    def _normalized_absolute(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not _DEVICE_PATH_RE.fullmatch(value):
            raise ValueError(
                "device_path must be an absolute path of letters, digits and ._:+@,=/- only"
            )
        if posixpath.normpath(value) != value or "/../" in f"{value}/" or "/./" in f"{value}/":
            raise ValueError("device_path must be normalized (no '.', '..' or '//' parts)")
        return value

    @model_validator(mode="after")
    def _one_device(self) -> PrepareExport:
        if (self.device_path is None) == (self.volume_id is None):
            raise ValueError("give exactly one of device_path and volume_id")
        return self

    @property
    def export_name(self) -> str:
        return export_name(self.vm_id, self.disk_unit_number)


class _DiskJob(BaseModel):
    """A job about one disk's export that names no device: the mapping says which."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    job_id: JobId = Field(examples=["job-43"])
    vm_id: VmId = Field(examples=["4205784a-098a-40f1-1f1e-a5cd2597fd59"])
    disk_unit_number: DiskUnitNumber = Field(examples=[0])
    generation: int | None = Field(
        default=None,
        ge=1,
        le=MAX_GENERATION,
        strict=True,
        description="Optional fence: the generation export-ready gave. One older than the "
        "export's current one (a later prepare-export took it over) answers "
        "stale_generation and changes nothing.",
        examples=[7],
    )

    @property
    def export_name(self) -> str:
        return export_name(self.vm_id, self.disk_unit_number)


class ReleaseExport(_DiskJob):
    """A scheduler's request: stop serving one disk of one VM (on the same queue as
    prepare-export, told apart by `type`)."""

    type: Literal["release-export"]
    mode: Literal["safe", "drain", "force"] = Field(
        default="safe",
        description="safe: with connections open, change nothing and answer export_in_use. "
        "drain: admit no new connection, wait up to wait_s for the open ones to end, then "
        "flush and release (or answer export_in_use, still admitting nobody). force: admit "
        "no new connection, cut the open ones, flush, release.",
    )
    wait_s: float = Field(
        default=30.0,
        ge=0,
        le=MAX_DRAIN_WAIT_S,
        description=f"drain: how long to wait for the clients to leave (0 to {MAX_DRAIN_WAIT_S}).",
    )


class FlushExport(_DiskJob):
    """A scheduler's request: make everything written through one disk's export durable
    (fsync of its device), e.g. when a copy has finished, before a snapshot or a detach."""

    type: Literal["flush-export"]


class InspectExport(_DiskJob):
    """A scheduler's request: the export's live state (connections, bytes written and read,
    idle time) and its mapping. Changes nothing; answered with export-status."""

    type: Literal["inspect-export"]
    renew: bool = Field(
        default=False, description="Also renew the export's lease (as prepare-export would)."
    )


#: ovirt-imageio's blkhash defaults (ovirt_imageio/_internal/blkhash.py): the same here, so
#: that a scheduler comparing with `ovirt_imageio.client.checksum()` needs no parameters.
CHECKSUM_ALGORITHM: Final = "blake2b"
CHECKSUM_BLOCK_SIZE = 4 * 1024**2
#: ovirt-imageio's limits (ovirt_imageio/_internal/handlers/checksum.py): a quarter to four
#: times the default block, aligned to 4096.
MIN_CHECKSUM_BLOCK_SIZE = CHECKSUM_BLOCK_SIZE // 4
MAX_CHECKSUM_BLOCK_SIZE = CHECKSUM_BLOCK_SIZE * 4
#: hashlib's algorithms every Python has, but the shake ones, whose digest has no fixed
#: length (ovirt-imageio's hexdigest() would fail on them).
ChecksumAlgorithm = Literal[
    "blake2b",
    "blake2s",
    "md5",
    "sha1",
    "sha224",
    "sha256",
    "sha384",
    "sha3_224",
    "sha3_256",
    "sha3_384",
    "sha3_512",
    "sha512",
]
CHECKSUM_ALGORITHMS: tuple[str, ...] = get_args(ChecksumAlgorithm)


class ChecksumExport(_DiskJob):
    """A scheduler's request: the checksum of what a new connection to the export would
    read, after a flush, as ovirt-imageio computes it (answered with export-checksum once
    hashed, maybe long after the request was acked)."""

    type: Literal["checksum-export"]
    algorithm: ChecksumAlgorithm = Field(
        default=CHECKSUM_ALGORITHM,
        description="A hashlib algorithm, as ovirt-imageio's checksum takes it (blake2b "
        "and blake2s with a 32-byte digest).",
    )
    block_size: int = Field(
        default=CHECKSUM_BLOCK_SIZE,
        ge=MIN_CHECKSUM_BLOCK_SIZE,
        le=MAX_CHECKSUM_BLOCK_SIZE,
        multiple_of=4096,
        strict=True,
        description="Bytes per block (1 MiB to 16 MiB, a multiple of 4096); must match the "
        "source side's to compare.",
    )


def _request_type(value: object) -> object:
    # `type` is optional for prepare-export, the original (and most common) message.
    if isinstance(value, dict):
        return value.get("type", "prepare-export")
    return getattr(value, "type", None)


Request = Annotated[
    Annotated[PrepareExport, Tag("prepare-export")]
    | Annotated[ReleaseExport, Tag("release-export")]
    | Annotated[FlushExport, Tag("flush-export")]
    | Annotated[InspectExport, Tag("inspect-export")]
    | Annotated[ChecksumExport, Tag("checksum-export")],
    Discriminator(_request_type),
]


class ExportReleased(BaseModel):
    """Release reply. New connections to the export fail from now on; established ones
    keep their device; the server forgets the name at its next restart."""

    model_config = ConfigDict(frozen=True)

    job_id: str
    vm_id: str
    disk_unit_number: int
    status: Literal["released"] = "released"
    export_name: str
    was_active: bool = Field(description="False when there was nothing to release.")
    flushed: bool = Field(
        # A default for records of releases made before releases flushed (they did not).
        default=False,
        description="True when the export's device was fsynced before the export was "
        "removed: everything written through it is on the volume. False when there was "
        "nothing to release, or the device was gone (detached) and could not be flushed.",
    )
    node_id: str
    mode: Literal["safe", "drain", "force"] = "safe"
    cut: int = Field(default=0, description="force: connections cut before the flush.")


class ExportFlushed(BaseModel):
    """Flush reply: everything written through the export before the job arrived is on the
    volume (its device was fsynced through the export's link)."""

    model_config = ConfigDict(frozen=True)

    job_id: str
    vm_id: str
    disk_unit_number: int
    status: Literal["flushed"] = "flushed"
    export_name: str
    device_path: str = Field(description="The device the export serves, as its mapping names it.")
    node_id: str


class ExportChecksum(BaseModel):
    """Checksum reply: `algorithm`, `block_size` and `checksum` are what
    `ovirt_imageio.client.checksum()` returns for an image with the same content."""

    model_config = ConfigDict(frozen=True)

    job_id: str
    vm_id: str
    disk_unit_number: int
    status: Literal["checksummed"] = "checksummed"
    export_name: str
    device_path: str = Field(description="The device hashed, as its mapping names it.")
    node_id: str
    algorithm: str = Field(examples=["blake2b"])
    block_size: int = Field(examples=[4194304])
    checksum: str = Field(description="Hex digest of the block digests.")
    size: int = Field(description="Bytes hashed: the whole device.")
    zero_bytes: int = Field(description="Of them, in blocks that were all zeros (or holes).")
    elapsed_s: float = Field(description="Hashing time (the last run, after a restart).")


class ChecksumProgress(BaseModel):
    """A checksum running on the export, in inspect-export."""

    model_config = ConfigDict(frozen=True)

    job_id: str
    bytes_hashed: int
    size: int
    started_at: datetime


class ExportReady(BaseModel):
    """Success reply: connect to `export_name` on `nbd_host:nbd_port`."""

    model_config = ConfigDict(frozen=True)

    job_id: str
    vm_id: str
    disk_unit_number: int
    status: Literal["ready"] = "ready"
    export_name: str
    device_path: str = Field(
        description="The path the export serves: the request's device_path, or the stable "
        "/dev/disk/by-id/ link its volume_id resolved to."
    )
    kernel_device: str = Field(
        description="What device_path resolves to now (e.g. /dev/vdb), for operators' logs."
    )
    volume_id: str | None = None
    reused: bool = Field(description="True when serving the job needed no SIGHUP.")
    action: Action
    nbd_host: str = Field(description="Where clients connect: this node's advertised host.")
    nbd_port: int
    node_id: str = Field(description="The appliance (node) whose nbd-server serves the export.")
    client_addresses: list[str] | None = Field(
        # A default for records of replies made before exports had access control.
        default=None,
        description="Who may connect to the export now (the job's client_addresses, or the "
        "worker's default), normalized: the export refuses everyone else but the worker's "
        "own probes.",
    )
    tls: bool = Field(
        # A default for records of replies made before exports could require TLS.
        default=False,
        description="True: connect with TLS (nbds://) and a client certificate the "
        "appliance's CA signed; the export refuses plain clients.",
    )
    generation: int = Field(
        # A default for records of replies made before generations.
        default=0,
        description="Grows with every successful prepare-export of this (node, VM, disk): "
        "give it to flush-export, release-export and inspect-export to be refused "
        "(stale_generation) once someone else prepared the disk since.",
    )
    lease_expires_at: datetime | None = Field(
        default=None,
        description="When the export expires unless renewed (the database's clock, UTC); "
        "null without a lease.",
    )


class ConnectionStatus(BaseModel):
    """One connection of an export, as the worker last sampled it."""

    model_config = ConfigDict(frozen=True)

    client_address: str = Field(examples=["10.0.0.7"])
    client_port: int
    connected_at: datetime
    tls: bool = Field(description="The connection is TLS (the export refuses plain clients).")
    device: Literal["current", "previous"] = Field(
        description="`previous`: opened before the export was relinked to another device, "
        "so this connection writes the export's previous device."
    )
    bytes_written: int = Field(description="Data written through this connection.")
    bytes_read: int = Field(description="Data read through this connection.")


class ExportLiveState(BaseModel):
    """What happens on an export, from samples of the server's connections (read-only)."""

    model_config = ConfigDict(frozen=True)

    connections: list[ConnectionStatus] = Field(description="Open now.")
    connections_total: int = Field(description="Connections since the export was prepared.")
    bytes_written: int = Field(
        description="Data written through the export since it was prepared, by every "
        "connection, ended ones included (zeroes and trims carry no data: not counted). "
        "Never goes back."
    )
    bytes_read: int = Field(description="Data read through the export since it was prepared.")
    last_io_at: datetime | None = Field(description="The last sample that saw I/O; null: none.")
    idle_seconds: float = Field(
        description="Since the last I/O (or since the export was prepared, if none)."
    )
    device_size: int | None = Field(description="The size of the export's device, in bytes.")
    planned_bytes: int | None = Field(description="As the last prepare-export said.")
    progress: float | None = Field(
        description="bytes_written / planned_bytes, at most 1.0; null without planned_bytes."
    )
    sampled_at: datetime


class ExportStatus(BaseModel):
    """Inspect reply: the export's mapping and, while it is active, its live state."""

    model_config = ConfigDict(frozen=True)

    job_id: str
    vm_id: str
    disk_unit_number: int
    status: Literal["inspected"] = "inspected"
    export_name: str
    node_id: str
    export_status: Literal["active", "released", "unknown"] = Field(
        description="`unknown`: this node never prepared the (VM, disk)."
    )
    device_path: str | None = None
    client_addresses: list[str] | None = None
    tls: bool | None = None
    flush_error: str | None = Field(
        default=None, description="Why an earlier flush failed (kept until a new copy)."
    )
    live: ExportLiveState | None = Field(
        default=None,
        description="While the export is active and the server could be sampled; null "
        "otherwise (`live_error` says why, when it is active).",
    )
    live_error: str | None = None
    generation: int | None = None
    lease_expires_at: datetime | None = None
    fenced: bool = Field(
        default=False,
        description="The export admits no new connection: a drain or an expiry is under way.",
    )
    checksum: ChecksumProgress | None = Field(
        default=None, description="A checksum-export running on the export now."
    )


class ExportEvent(BaseModel):
    """Published to the worker's exchange with routing key `event.<node>.<kind>`.

    `connected` and `disconnected`: a connection of an export began or ended; at most once
    (a scheduler that must not miss one inspects the export). `expiring`: the export's lease
    ends at `lease_expires_at` unless renewed; `expired`: it was released at its lease's or
    idle timeout's end (`forced`: connections were cut, `cut` of them); `expiry_failed`: it
    could not be (`error`), and stays fenced. The lease events are at least once, a repeat
    identical. `seq` grows by one per event of the export's copy."""

    model_config = ConfigDict(frozen=True)

    type: Literal["export-event"] = "export-event"
    kind: Literal["connected", "disconnected", "expiring", "expired", "expiry_failed"]
    seq: int = Field(description="Per export, since it was prepared: 1, 2, 3, ...")
    at: datetime
    node_id: str
    vm_id: str
    disk_unit_number: int
    export_name: str
    #: connected, disconnected: the connection (with disconnected, its final counts).
    connection: ConnectionStatus | None = None
    connections: int = Field(description="The export's connections open after this event.")
    connections_total: int
    bytes_written: int = Field(description="The export's totals after this event.")
    bytes_read: int
    generation: int | None = Field(default=None, description="Lease events: the export's.")
    lease_expires_at: datetime | None = Field(
        default=None, description="expiring: when the lease ends unless renewed."
    )
    reason: Literal["lease", "idle"] | None = Field(
        default=None, description="expiring, expired: the lease's end, or the idle timeout."
    )
    forced: bool = Field(default=False, description="expired: connections were cut.")
    cut: int = Field(default=0, description="expired: how many connections were cut.")
    error: ErrorDetail | None = Field(default=None, description="expiry_failed: why.")


class ErrorDetail(BaseModel):
    model_config = ConfigDict(frozen=True)

    code: ErrorCode
    message: str
    cause: ErrorCode | None = Field(
        default=None,
        description="With retries_exhausted: the transient failure that outlasted the "
        "retries (e.g. nbd_server_unavailable).",
    )
    errno: str | None = Field(
        default=None,
        description="With flush_failed: the error fsync gave, e.g. EIO or ENOSPC.",
        examples=["EIO"],
    )
    connections: list[ConnectionStatus] | None = Field(
        default=None, description="With export_in_use: the connections open."
    )


class ExportFailed(BaseModel):
    """Error reply. `job_id` is null only when the request was unreadable."""

    model_config = ConfigDict(frozen=True)

    job_id: str | None
    vm_id: str | None = None
    disk_unit_number: int | None = None
    status: Literal["error"] = "error"
    error: ErrorDetail
    node_id: str | None = None


ExportEvent.model_rebuild()

#: What a job the flow ran answers; a failure is answered with an ExportFailed instead.
JobReply = ExportReady | ExportReleased | ExportFlushed | ExportStatus | ExportChecksum
Reply = JobReply | ExportFailed
AnyRequest = PrepareExport | ReleaseExport | FlushExport | InspectExport | ChecksumExport


def parse_request(body: bytes) -> AnyRequest:
    """A prepare-export (the default), a release-export, a flush-export, an inspect-export
    or a checksum-export. Raises ValidationError."""
    return _REQUEST.validate_json(body)


_REQUEST: TypeAdapter[AnyRequest] = TypeAdapter(Request)


#: File name (in schema/messages/) -> model. Generated by `nbd-export-worker schemas`.
SCHEMA_FILES: dict[str, type[BaseModel]] = {
    "prepare-export.json": PrepareExport,
    "release-export.json": ReleaseExport,
    "flush-export.json": FlushExport,
    "inspect-export.json": InspectExport,
    "checksum-export.json": ChecksumExport,
    "export-ready.json": ExportReady,
    "export-released.json": ExportReleased,
    "export-flushed.json": ExportFlushed,
    "export-status.json": ExportStatus,
    "export-checksum.json": ExportChecksum,
    "export-failed.json": ExportFailed,
    "export-event.json": ExportEvent,
}


def message_schemas() -> dict[str, str]:
    """Each message's JSON Schema as the text kept in schema/messages/."""
    schemas = {}
    for name, model in SCHEMA_FILES.items():
        # Requests are described as the worker reads them, replies as it writes them.
        requests = (PrepareExport, ReleaseExport, FlushExport, InspectExport, ChecksumExport)
        mode: JsonSchemaMode = "validation" if model in requests else "serialization"
        schema = model.model_json_schema(mode=mode)
        schemas[name] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return schemas


def write_schemas(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in message_schemas().items():
        (directory / name).write_text(text)
        written.append(directory / name)
    return written


def salvage_job_id(body: bytes) -> str | None:
    """The job_id of a request that failed validation, if it has a well-formed one.

    Lets an invalid request still get a reply the scheduler can match to its job.
    """
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):  # deep nesting: [[[[...
        return None
    job_id = data.get("job_id") if isinstance(data, dict) else None
    if isinstance(job_id, str) and _JOB_ID_RE.fullmatch(job_id):
        return job_id
    return None
