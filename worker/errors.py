"""The worker's errors: each maps to one reply code and says whether retrying may help.

Adapters raise these, never a bare OSError or driver error; only the consumer catches
Exception, and it reports anything it does not know as `internal_error`. An error that can
be raised in several places takes named fields and builds its message from one template
(as ovirt-imageio's errors do): one wording wherever it comes from, and fields a caller
can read; tests/unit/test_errors.py pins the texts.
"""

from __future__ import annotations

from typing import ClassVar

from worker.messages import ConnectionStatus, ErrorCode


class WorkerError(Exception):
    """Base class. The message is safe to send in a reply: no secrets, no tracebacks."""

    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL_ERROR
    retryable: ClassVar[bool] = False


class InvalidRequest(WorkerError):
    """The request breaks the contract; resending it unchanged can never succeed."""

    code = ErrorCode.INVALID_REQUEST


class DeviceNotFound(WorkerError):
    """The device path does not exist (yet): the volume may not be attached."""

    code = ErrorCode.DEVICE_NOT_FOUND


class DeviceInUse(WorkerError):
    """Another active mapping already serves this device; nothing was changed."""

    code = ErrorCode.DEVICE_IN_USE


class ServerUnavailable(WorkerError):
    """nbd-server is not running, not ours, too old, or did not answer a probe in time."""

    code = ErrorCode.NBD_SERVER_UNAVAILABLE
    retryable = True


class ServerMisconfigured(ServerUnavailable):
    """The running nbd-server is set up so that the worker's exports cannot load (another
    `-C` than the pinned one, an `includedir` that is not the snippet directory). Only an
    operator fixes it: retrying would only delay the answer."""

    code = ErrorCode.NBD_SERVER_MISCONFIGURED
    retryable = False


class ProbeTimeout(ServerUnavailable):
    """A probe got no answer in time: the server may be hung (accepts, never answers)."""


class UnsupportedServer(ServerUnavailable):
    """The running nbd-server must not be signalled (too old); fatal at start-up."""

    retryable = False


class UnsafeServer(UnsupportedServer):
    """The running nbd-server failed the data-path self-test: it would corrupt or lose what
    copy tools write through it. Refused like a too-old server, reuse included."""


class FlushFailed(WorkerError):
    """The export's device could not be made durable: what was written through it may not
    be on the volume. The job may be sent again; `lost_writes` says whether an fsync itself
    failed (then the failure is kept on the mapping: a later fsync would not report it
    again), `device_gone` whether the device could not even be opened (detached)."""

    code = ErrorCode.FLUSH_FAILED

    def __init__(
        self,
        message: str,
        errno_name: str | None = None,
        *,
        lost_writes: bool = False,
        device_gone: bool = False,
    ) -> None:
        super().__init__(message)
        self.errno_name = errno_name
        self.lost_writes = lost_writes
        self.device_gone = device_gone


class ExportNotFound(WorkerError):
    """The job names a (VM, disk) this node has no active export for."""

    code = ErrorCode.EXPORT_NOT_FOUND


class ExportChanged(WorkerError):
    """checksum-export: the export was released or relinked while its device was hashed;
    no checksum of what it serves can be given."""

    code = ErrorCode.EXPORT_CHANGED


class ExportInUse(WorkerError):
    """A release found connections open and released nothing: an answer, not a failure."""

    code = ErrorCode.EXPORT_IN_USE

    def __init__(self, message: str, connections: list[ConnectionStatus]) -> None:
        super().__init__(message)
        self.connections = connections


class StaleGeneration(WorkerError):
    """The job names another generation than the export's current one."""

    code = ErrorCode.STALE_GENERATION

    def __init__(self, export_name: str, given: int, current: int) -> None:
        super().__init__(
            f"export {export_name} is at generation {current}, not {given}: a later "
            "prepare-export took it over; nothing was changed"
        )


class ExportNotVisible(WorkerError):
    """The server was reloaded but did not know the export (NBD_OPT_GO) before the deadline,
    or knows it but does not open it."""

    code = ErrorCode.EXPORT_NOT_VISIBLE
    retryable = True


class RestartRequired(WorkerError):
    """The running server serves an export differently from its config (a reload cannot
    change an existing export); only an operator's restart of nbd-server fixes it."""

    code = ErrorCode.RESTART_REQUIRED
    template: ClassVar[str] = (
        "export {export_name} {reason}; a reload cannot change an export the server has "
        "loaded: restart nbd-server"
    )

    def __init__(self, export_name: str, reason: str) -> None:
        self.export_name, self.reason = export_name, reason
        super().__init__(self.template.format(export_name=export_name, reason=reason))


class Superseded(WorkerError):
    """Another job changed or released this export while this one waited for the lock:
    nothing was done for this job, and its plan no longer holds. Retried: the next try
    plans again from what the other job left."""

    code = ErrorCode.SUPERSEDED
    retryable = True
    template: ClassVar[str] = (
        "export {export_name} was changed or released by another job while this one "
        "waited; nothing was done for this job"
    )

    def __init__(self, export_name: str) -> None:
        self.export_name = export_name
        super().__init__(self.template.format(export_name=export_name))


class ConfigWriteError(WorkerError):
    """A snippet, link, authfile or directory could not be written (disk full, read-only,
    permissions): retried, as an operator may free the space."""

    code = ErrorCode.CONFIG_WRITE_FAILED
    retryable = True
    template: ClassVar[str] = "cannot {action} {target}: {reason}"

    def __init__(self, action: str, target: object, reason: str | None) -> None:
        self.action, self.target, self.reason = action, str(target), reason or "failed"
        super().__init__(
            self.template.format(action=action, target=self.target, reason=self.reason)
        )


class TransientDatabaseError(WorkerError):
    """Deadlock, lock wait timeout or lost connection: the transaction may be retried."""

    code = ErrorCode.DATABASE_UNAVAILABLE
    retryable = True


class DatabaseError(WorkerError):
    """Any other database failure: a statement the server refused, a session that is not
    encrypted although TLS is required. Not retried: the message says what to fix."""

    code = ErrorCode.DATABASE_ERROR
    template: ClassVar[str] = "database error {errno}: {text}"

    def __init__(self, text: str, errno: int = 0) -> None:
        self.text, self.errno = text, errno
        # errno 0: the worker's own finding, not the server's answer.
        super().__init__(
            self.template.format(errno=errno, text=text) if errno else f"database error: {text}"
        )


class TransactionConflict(TransientDatabaseError):
    """A deadlock, or a Galera certification failure or brute-force abort (1213, 1317, 1146:
    worker/db_errors.py): the statement is retried at once, on its own."""
