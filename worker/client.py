"""SchedulerClient: the scheduler's side of the message contract (docs/contract.md), typed.

Requests are built with the contract's own models, so bad input fails before anything is
published. They go out with publisher confirms through ConfirmedPublisher (a nack or a
missing confirm is published again on a fresh channel: RabbitMQ 3.10 keeps nacking a
channel first used during a leader election), and come back on a private reply queue,
matched by correlation_id, as the reply models; an error reply raises the ExportError
subclass of its code.

The connection fails over across the broker URLs and comes back after a drop. The reply
queue is exclusive, so it dies with the connection: a new one is declared and every request
still waiting is published again with it. The worker answers a job_id from its record,
identically, so such a request may be answered twice: the first reply wins.

`lease()` holds an export for the length of a block: prepared with a lease, renewed at a
third of it, released (drain, generation-fenced) on the way out.

Over 400 lines (budget 800): the scheduler's whole side in one module, as messages.py is
the whole contract: one exception class per error code, the five jobs, the connection that
comes back, and the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import ClassVar, Literal, TypedDict, TypeVar, Unpack

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from worker.messages import (
    CHECKSUM_ALGORITHM,
    CHECKSUM_BLOCK_SIZE,
    AnyRequest,
    ChecksumAlgorithm,
    ChecksumExport,
    ConnectionStatus,
    ErrorCode,
    ExportChecksum,
    ExportFailed,
    ExportFlushed,
    ExportReady,
    ExportReleased,
    ExportStatus,
    FlushExport,
    InspectExport,
    PrepareExport,
    ReleaseExport,
)
from worker.publisher import ConfirmedPublisher, PublishFailed, Unroutable
from worker.settings import Settings, mask_url
from worker.topology import node_routing_key

log = logging.getLogger(__name__)

#: The worker's default request queue (the settings' own default, so the two cannot drift).
DEFAULT_REQUEST_QUEUE: str = Settings.model_fields["request_queue"].default
#: Between rounds over every broker URL after a drop: doubles up to the cap.
RECONNECT_FIRST_S = 0.5
RECONNECT_MAX_S = 10.0
#: How long one publish waits for its confirm before a fresh channel is tried.
CONFIRM_TIMEOUT_S = 10.0

Mode = Literal["safe", "drain", "force"]
R = TypeVar("R", ExportReady, ExportStatus, ExportFlushed, ExportReleased, ExportChecksum)


class ClientError(Exception):
    """Base of everything SchedulerClient raises about a request."""


class ReplyTimeout(ClientError, TimeoutError):
    """No reply in time. The job may still run: send it again with the same job_id to learn
    how it ended (prepare, flush and release are answered from the worker's record)."""


class NotPublished(ClientError):
    """The broker did not take the request: no queue is bound to its routing key, or no
    confirm came within the budget."""


class UnexpectedReply(ClientError):
    """A reply that is neither the request's answer nor an export-failed."""


class ClientClosed(ClientError):
    """The client was closed before the reply came."""


class ExportError(ClientError):
    """An export-failed reply: its `code`, `message` and the whole `reply`. One subclass per
    ErrorCode (ERROR_CLASSES); `from_reply` picks it."""

    #: The code a subclass stands for.
    CODE: ClassVar[ErrorCode | None] = None

    def __init__(self, code: ErrorCode, message: str, reply: ExportFailed) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
        self.reply = reply

    @staticmethod
    def from_reply(reply: ExportFailed) -> ExportError:
        error = reply.error
        return ERROR_CLASSES.get(error.code, ExportError)(error.code, error.message, reply)


class InvalidRequest(ExportError):
    """The worker refused the message (or a job_id reused for another job); dead-lettered."""

    CODE = ErrorCode.INVALID_REQUEST


class DeviceNotFound(ExportError):
    CODE = ErrorCode.DEVICE_NOT_FOUND


class DeviceInUse(ExportError):
    CODE = ErrorCode.DEVICE_IN_USE


class NbdServerUnavailable(ExportError):
    CODE = ErrorCode.NBD_SERVER_UNAVAILABLE


class NbdServerMisconfigured(ExportError):
    CODE = ErrorCode.NBD_SERVER_MISCONFIGURED


class ExportNotVisible(ExportError):
    """Only a `cause` today (of retries_exhausted); here so that any code has a class."""

    CODE = ErrorCode.EXPORT_NOT_VISIBLE


class DatabaseUnavailable(ExportError):
    CODE = ErrorCode.DATABASE_UNAVAILABLE


class InternalError(ExportError):
    CODE = ErrorCode.INTERNAL_ERROR


class FlushFailed(ExportError):
    """The data may not be on the volume: prepare again, copy again, flush again."""

    CODE = ErrorCode.FLUSH_FAILED

    @property
    def errno(self) -> str | None:
        return self.reply.error.errno


class ExportNotFound(ExportError):
    CODE = ErrorCode.EXPORT_NOT_FOUND


class ExportChanged(ExportError):
    """checksum-export: the export was released or relinked while it was hashed."""

    CODE = ErrorCode.EXPORT_CHANGED


class ExportInUse(ExportError):
    """Not a failure: connections are open (`connections`); release again later."""

    CODE = ErrorCode.EXPORT_IN_USE

    @property
    def connections(self) -> list[ConnectionStatus]:
        return self.reply.error.connections or []


class StaleGeneration(ExportError):
    """A later prepare-export took the export over; nothing changed."""

    CODE = ErrorCode.STALE_GENERATION


class RestartRequired(ExportError):
    CODE = ErrorCode.RESTART_REQUIRED


class Superseded(ExportError):
    CODE = ErrorCode.SUPERSEDED


class ConfigWriteFailed(ExportError):
    CODE = ErrorCode.CONFIG_WRITE_FAILED


class DatabaseError(ExportError):
    CODE = ErrorCode.DATABASE_ERROR


class RetriesExhausted(ExportError):
    """A transient failure (`cause`) outlasted every retry; the job is dead-lettered."""

    CODE = ErrorCode.RETRIES_EXHAUSTED

    @property
    def cause(self) -> ErrorCode | None:
        return self.reply.error.cause


def _error_classes() -> dict[ErrorCode, type[ExportError]]:
    classes: dict[ErrorCode, type[ExportError]] = {}
    for cls in ExportError.__subclasses__():
        if cls.CODE is not None:
            classes[cls.CODE] = cls
    return classes


#: ErrorCode -> the exception an export-failed with that code raises.
ERROR_CLASSES = _error_classes()


def parse_reply(body: bytes, expected: type[R]) -> R:
    """`body` as the `expected` reply; raises the ExportError of an export-failed, and
    UnexpectedReply for anything else."""
    try:
        failed = json.loads(body).get("status") == "error"
        reply = ExportFailed.model_validate_json(body) if failed else None
        answer = None if failed else expected.model_validate_json(body)
    except (ValueError, AttributeError) as exc:  # bad JSON, not an object, a ValidationError
        raise UnexpectedReply(f"not an export-failed nor a {expected.__name__}: {exc}") from exc
    if reply is not None:
        raise ExportError.from_reply(reply)
    assert answer is not None
    return answer


def new_job_id() -> str:
    return f"sched-{uuid.uuid4().hex}"


class PrepareOptions(TypedDict, total=False):
    """prepare()'s optional keywords, also taken by lease()."""

    client_addresses: Sequence[str] | None
    planned_bytes: int | None
    idle_timeout_s: int | None
    job_id: str | None
    timeout_s: float | None


@dataclass(eq=False)
class _Session:
    """One broker connection: its reply queue, and its publisher (a channel of its own, so
    that a nack that retires it leaves the consuming channel alone)."""

    connection: AbstractConnection
    publisher: ConfirmedPublisher
    reply_queue: str
    lost: asyncio.Event


@dataclass(eq=False)
class _Pending:
    body: bytes
    routing_key: str
    exchange: str
    correlation_id: str
    reply: asyncio.Future[bytes]
    #: The session it was last published on: any other session publishes it again.
    session: _Session | None = None


def _setter(event: asyncio.Event) -> Callable[..., None]:
    def on_close(*_: object) -> None:
        event.set()

    return on_close


class SchedulerClient:
    """Sends jobs to the workers and waits for their replies. Make one with `connect()`;
    safe for many concurrent requests."""

    def __init__(
        self,
        urls: list[str],
        *,
        exchange: str,
        request_queue: str,
        node_id: str | None,
        timeout_s: float,
        connect_timeout_s: float,
    ) -> None:
        self._urls = urls
        self._exchange = exchange
        self._request_queue = request_queue
        self._node_id = node_id
        self.timeout_s = timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._session: _Session | None = None
        self._pending: dict[str, _Pending] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._keeper: asyncio.Task[None] | None = None
        self._closed = False
        #: Connections made again after a drop.
        self.reconnects = 0

    @classmethod
    async def connect(
        cls,
        amqp_urls: str | list[str],
        *,
        exchange: str = "nbd.exports",
        request_queue: str | None = None,
        node_id: str | None = None,
        timeout_s: float = 30.0,
        connect_timeout_s: float | None = None,
    ) -> SchedulerClient:
        """Connects to the first broker of `amqp_urls` that answers (a string may list
        several, separated by commas, as EXPORT_WORKER_AMQP_URL does); raises its error when
        none does. With `node_id` jobs go to `exchange` with routing key `<type>.<node_id>`,
        otherwise straight to `request_queue`. `timeout_s`: each request's default."""
        urls = (
            [u.strip() for u in amqp_urls.split(",")] if isinstance(amqp_urls, str) else amqp_urls
        )
        if not urls or not all(urls):
            raise ValueError("at least one broker URL is required")
        client = cls(
            list(urls),
            exchange=exchange,
            request_queue=request_queue or DEFAULT_REQUEST_QUEUE,
            node_id=node_id,
            timeout_s=timeout_s,
            connect_timeout_s=connect_timeout_s or timeout_s,
        )
        session, index = await client._open(0, retry=False)
        client._session = session
        client._keeper = asyncio.create_task(client._keep(session, index))
        return client

    async def __aenter__(self) -> SchedulerClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in [*self._tasks, *([self._keeper] if self._keeper else [])]:
            task.cancel()
        for pending in self._pending.values():
            if not pending.reply.done():
                pending.reply.set_exception(ClientClosed("the client was closed"))
        if self._session is not None:
            with contextlib.suppress(Exception):
                await self._session.connection.close()
            self._session = None

    # --- The jobs ---

    async def prepare(
        self,
        vm_id: str,
        disk: int,
        *,
        vm_name: str,
        device_path: str | None = None,
        volume_id: str | None = None,
        lease_s: int | None = None,
        client_addresses: Sequence[str] | None = None,
        planned_bytes: int | None = None,
        idle_timeout_s: int | None = None,
        job_id: str | None = None,
        timeout_s: float | None = None,
    ) -> ExportReady:
        """Serves the disk (exactly one of `device_path` and `volume_id`)."""
        request = PrepareExport(
            job_id=job_id or new_job_id(),
            vm_id=vm_id,
            vm_name=vm_name,
            disk_unit_number=disk,
            device_path=device_path,
            volume_id=volume_id,
            client_addresses=None if client_addresses is None else tuple(client_addresses),
            planned_bytes=planned_bytes,
            lease_s=lease_s,
            idle_timeout_s=idle_timeout_s,
        )
        return await self._call(request, ExportReady, timeout_s)

    async def inspect(
        self,
        vm_id: str,
        disk: int,
        *,
        renew: bool = False,
        generation: int | None = None,
        job_id: str | None = None,
        timeout_s: float | None = None,
    ) -> ExportStatus:
        request = InspectExport(
            type="inspect-export",
            job_id=job_id or new_job_id(),
            vm_id=vm_id,
            disk_unit_number=disk,
            renew=renew,
            generation=generation,
        )
        return await self._call(request, ExportStatus, timeout_s)

    async def flush(
        self,
        vm_id: str,
        disk: int,
        *,
        generation: int | None = None,
        job_id: str | None = None,
        timeout_s: float | None = None,
    ) -> ExportFlushed:
        request = FlushExport(
            type="flush-export",
            job_id=job_id or new_job_id(),
            vm_id=vm_id,
            disk_unit_number=disk,
            generation=generation,
        )
        return await self._call(request, ExportFlushed, timeout_s)

    async def checksum(
        self,
        vm_id: str,
        disk: int,
        *,
        algorithm: ChecksumAlgorithm = CHECKSUM_ALGORITHM,
        block_size: int = CHECKSUM_BLOCK_SIZE,
        generation: int | None = None,
        job_id: str | None = None,
        timeout_s: float | None = None,
    ) -> ExportChecksum:
        """The checksum of what the export serves, after a flush; equal to
        `ovirt_imageio.client.checksum()` of the source image with the same parameters.
        It reads the whole device: give a `timeout_s` fit for its size (about 1 s per GiB
        of data on the appliance's disks)."""
        request = ChecksumExport(
            type="checksum-export",
            job_id=job_id or new_job_id(),
            vm_id=vm_id,
            disk_unit_number=disk,
            algorithm=algorithm,
            block_size=block_size,
            generation=generation,
        )
        return await self._call(request, ExportChecksum, timeout_s)

    async def release(
        self,
        vm_id: str,
        disk: int,
        *,
        mode: Mode = "safe",
        wait_s: float = 30.0,
        generation: int | None = None,
        job_id: str | None = None,
        timeout_s: float | None = None,
    ) -> ExportReleased:
        request = ReleaseExport(
            type="release-export",
            job_id=job_id or new_job_id(),
            vm_id=vm_id,
            disk_unit_number=disk,
            mode=mode,
            wait_s=wait_s,
            generation=generation,
        )
        timeout = self.timeout_s if timeout_s is None else timeout_s
        # A drain answers only once the clients left or wait_s passed.
        return await self._call(
            request, ExportReleased, timeout + (wait_s if mode == "drain" else 0)
        )

    def lease(
        self,
        vm_id: str,
        disk: int,
        *,
        vm_name: str,
        lease_s: int,
        device_path: str | None = None,
        volume_id: str | None = None,
        release_wait_s: float = 60.0,
        **prepare_fields: Unpack[PrepareOptions],
    ) -> ExportLease:
        """`async with client.lease(...) as ready:` the export, renewed while inside and
        released (drain, up to `release_wait_s`) on the way out; see ExportLease."""

        def prepare() -> Awaitable[ExportReady]:
            return self.prepare(
                vm_id,
                disk,
                vm_name=vm_name,
                device_path=device_path,
                volume_id=volume_id,
                lease_s=lease_s,
                **prepare_fields,
            )

        return ExportLease(self, prepare, lease_s=lease_s, release_wait_s=release_wait_s)

    # --- Requests and replies ---

    async def _call(self, request: AnyRequest, expected: type[R], timeout_s: float | None) -> R:
        if self._closed:
            raise ClientClosed("the client is closed")
        if self._node_id is not None:
            routing_key, exchange = node_routing_key(request.type, self._node_id), self._exchange
        else:
            routing_key, exchange = self._request_queue, ""  # the default exchange
        pending = _Pending(
            request.model_dump_json(exclude_none=True).encode(),
            routing_key,
            exchange,
            uuid.uuid4().hex,
            asyncio.get_running_loop().create_future(),
        )
        self._pending[pending.correlation_id] = pending
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            async with asyncio.timeout(timeout):
                if self._session is not None:  # otherwise the next session publishes it
                    await self._publish(pending, self._session)
                body = await pending.reply
        except TimeoutError:
            unsent = "" if pending.session else " (not published: no broker connection)"
            raise ReplyTimeout(
                f"no reply to {request.type} job_id={request.job_id} within {timeout:g} s{unsent}"
            ) from None
        finally:
            del self._pending[pending.correlation_id]
        return parse_reply(body, expected)

    async def _publish(self, pending: _Pending, session: _Session) -> None:
        """Publishes `pending` on `session` unless it was already. What the broker refuses
        fails the request; a dropped connection does not (the next session publishes)."""
        if pending.session is session or pending.reply.done():
            return
        pending.session = session
        message = aio_pika.Message(
            pending.body,
            content_type="application/json",
            correlation_id=pending.correlation_id,
            reply_to=session.reply_queue,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        try:
            await session.publisher.publish(message, pending.routing_key, exchange=pending.exchange)
        except (Unroutable, PublishFailed) as exc:
            dropped = isinstance(exc, PublishFailed) and (
                session.lost.is_set() or session.connection.is_closed
            )
            if not dropped and not pending.reply.done():
                pending.reply.set_exception(NotPublished(str(exc)))

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        pending = self._pending.get(message.correlation_id or "")
        if pending is None or pending.reply.done():
            # Late (its request timed out), or a second answer after a republish.
            log.debug("Reply to no waiting request correlation_id=%s", message.correlation_id)
            return
        pending.reply.set_result(message.body)

    # --- The connection ---

    async def _start_session(self, url: str) -> _Session:
        connection = await aio_pika.connect(url, timeout=self._connect_timeout_s)
        lost = asyncio.Event()
        connection.close_callbacks.add(_setter(lost))
        try:
            channel = await connection.channel()
            # The broker may close just this channel: no replies then, so that is a loss too.
            channel.close_callbacks.add(_setter(lost))
            queue = await channel.declare_queue(exclusive=True, auto_delete=True)
            await queue.consume(self._on_reply, no_ack=True)
        except BaseException:
            with contextlib.suppress(Exception):
                await connection.close()
            raise
        publisher = ConfirmedPublisher(
            connection,
            timeout_s=min(CONFIRM_TIMEOUT_S, self.timeout_s),
            retry_s=self.timeout_s,
        )
        return _Session(connection, publisher, queue.name, lost)

    async def _open(self, start: int, *, retry: bool) -> tuple[_Session, int]:
        """A session with the first URL from `start` on that answers; with `retry`, round
        after round (with backoff) until one does, otherwise the last error."""
        delay = RECONNECT_FIRST_S
        while True:
            error: Exception = ValueError("no broker URL given")
            for offset in range(len(self._urls)):
                index = (start + offset) % len(self._urls)
                try:
                    return await self._start_session(self._urls[index]), index
                except (OSError, TimeoutError, aio_pika.exceptions.AMQPError) as exc:
                    log.warning(
                        "Broker unreachable url=%s error=%s", mask_url(self._urls[index]), exc
                    )
                    error = exc
            if not retry:
                raise error
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)

    async def _keep(self, session: _Session, index: int) -> None:
        """Reconnects after each drop, next broker first, and publishes again every request
        still waiting (its reply queue died with the connection)."""
        while True:
            await session.lost.wait()
            self._session = None
            log.warning(
                "Broker connection lost; reconnecting (%d request(s) waiting)", len(self._pending)
            )
            with contextlib.suppress(Exception):
                await session.connection.close()
            session, index = await self._open(index + 1, retry=True)
            self._session = session
            self.reconnects += 1
            for pending in list(self._pending.values()):
                task = asyncio.create_task(self._publish(pending, session))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)


class ExportLease:
    """An export held for the length of an `async with` block (SchedulerClient.lease).

    Entering prepares it with `lease_s` and yields the ExportReady; while inside, the lease
    is renewed every third of it (inspect-export with renew, fenced by the generation), so
    that the export outlives a slow block but not a dead scheduler. A renewal that finds the
    export taken over (StaleGeneration), released or fenced sets `lost` and stops; one that
    gets no answer is tried again at the next turn. Leaving releases it with mode drain and
    the generation; an ExportInUse or StaleGeneration then is logged, never raised, and no
    release error replaces the block's own exception.
    """

    def __init__(
        self,
        client: SchedulerClient,
        prepare: Callable[[], Awaitable[ExportReady]],
        *,
        lease_s: int,
        release_wait_s: float,
    ) -> None:
        self._client = client
        self._prepare = prepare
        self._lease_s = lease_s
        self._release_wait_s = release_wait_s
        self._renewer: asyncio.Task[None] | None = None
        self.ready: ExportReady | None = None
        #: Set once a renewal found the export gone or taken over (`lost_reason` says).
        self.lost = asyncio.Event()
        self.lost_reason: str | None = None
        self.renewals = 0
        self.lease_expires_at: datetime | None = None
        #: The release's reply, once the block is left (None if it was not released).
        self.released: ExportReleased | None = None

    async def __aenter__(self) -> ExportReady:
        self.ready = await self._prepare()
        self.lease_expires_at = self.ready.lease_expires_at
        self._renewer = asyncio.create_task(self._renew(self.ready))
        return self.ready

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.wait([self._renewer])  # not `await task`: it would re-raise
        ready = self.ready
        assert ready is not None
        try:
            self.released = await self._client.release(
                ready.vm_id,
                ready.disk_unit_number,
                mode="drain",
                wait_s=self._release_wait_s,
                generation=ready.generation,
            )
        except (ExportInUse, StaleGeneration) as error:
            log.warning("Leased export not released export_name=%s: %s", ready.export_name, error)
        except ClientError as error:
            if exc is None:
                raise
            log.error(  # noqa: TRY400 - the block's exception is the one to raise
                "Leased export not released export_name=%s: %s", ready.export_name, error
            )

    def _lose(self, ready: ExportReady, reason: str) -> None:
        self.lost_reason = reason
        self.lost.set()
        log.warning(
            "Lease lost export_name=%s generation=%d: %s; no longer renewed",
            ready.export_name,
            ready.generation,
            reason,
        )

    async def _renew(self, ready: ExportReady) -> None:
        every = self._lease_s / 3
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            # On a fixed beat, not `every` after the last answer: a slow or lost renewal
            # still leaves the next one time before the lease runs out.
            due += every
            await asyncio.sleep(max(0.0, due - loop.time()))
            try:
                status = await self._client.inspect(
                    ready.vm_id,
                    ready.disk_unit_number,
                    renew=True,
                    generation=ready.generation,
                    timeout_s=every,  # an answer later than that is no use for this turn
                )
            except StaleGeneration as error:
                self._lose(ready, f"taken over ({error.message})")
                return
            except ClientError as error:
                log.warning(
                    "Lease renewal failed export_name=%s: %s; trying again at the next turn",
                    ready.export_name,
                    error,
                )
                continue
            if status.export_status != "active" or status.fenced:
                self._lose(ready, "fenced" if status.fenced else f"export {status.export_status}")
                return
            self.renewals += 1
            self.lease_expires_at = status.lease_expires_at
