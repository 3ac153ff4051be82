"""vm_export_mappings on aiomysql: every SQL statement of the worker, its transactions,
deadlock retry, and the schema migrations.

Returns frozen Mapping models and raises the worker's errors, never driver errors.

Over 400 lines (budget 1320) on purpose: every SQL statement is here, so that the queries, their
transactions and their locking order are reviewed in one file.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.resources
import json
import logging
import re
import ssl
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import aiomysql
import pymysql
from pydantic import AnyUrl
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from worker.access import DEFAULT_CLIENT_ADDRESSES
from worker.coalesce import Coalescer
from worker.db_errors import ErrnoKind, classify_errno
from worker.db_tls import refuse_plaintext_logins, session_cipher
from worker.devices import Device
from worker.errors import (
    DatabaseError,
    DeviceInUse,
    TransactionConflict,
    TransientDatabaseError,
    WorkerError,
)
from worker.live import Tracked, Usage
from worker.mappings import (
    ChecksumJob,
    Claimed,
    CommittedExport,
    JobRecord,
    Lease,
    Mapping,
    OutboxEvent,
    mapping_of_row,
    resolve_stored,
    stored_addresses,
)
from worker.messages import PrepareExport
from worker.plan import SETTLED_MARK
from worker.retrying import call_with_retries

log = logging.getLogger(__name__)
T = TypeVar("T")

ER_DUP_ENTRY = 1062
_DB_NAME_RE = re.compile(r"^[A-Za-z0-9_]{1,64}$")

_COLUMNS = (
    "id, node_id, vm_id, disk_unit_number, vm_name, export_name, device_path, device_id, "
    "status, created_at, updated_at, last_job_id, last_action, flush_error, client_addresses, "
    "planned_bytes, prepared_at, generation, lease_s, lease_expires_at, idle_timeout_s, fenced_at"
)


_FIELDS = tuple(_COLUMNS.split(", "))
_CLIENT_ADDRESSES = _FIELDS.index("client_addresses")
#: TIMESTAMP columns the driver returns naive (in UTC: the session's zone).
_UTC_COLUMNS = tuple(
    _FIELDS.index(name) for name in ("prepared_at", "lease_expires_at", "fenced_at")
)
#: What a job needs of its mapping. The lookup runs for every job, and the driver parses
#: each result column's metadata in pure Python on every query (a profile of the reuse
#: path put 40 % of the worker's CPU in the lookup, most of it there): so the lookup returns
#: one JSON array column, decoded in C, instead of one column per field.
_LOOKUP_FIELDS = (
    "id", "vm_name", "export_name", "device_path", "device_id", "status", "last_job_id",
    "last_action", "flush_error", "client_addresses", "planned_bytes", "generation", "lease_s",
    "lease_expires_at", "idle_timeout_s", "fenced_at",
)  # fmt: skip
#: Lookup fields that JSON_ARRAY gives as text: "2026-12-07 10:00:00.000000" (UTC).
_LOOKUP_TIMES = ("lease_expires_at", "fenced_at")
#: Mapping lookups in flight at once; those asked meanwhile share the next statement, up
#: to LOOKUP_BATCH of them (the prefetch's default).
LOOKUP_STATEMENTS = 1
LOOKUP_BATCH = 64
#: Seconds a pooled connection may sit idle before it is replaced (the pool's, and the
#: held lookup connection's): well under the server's wait_timeout (8 h by default).
RECYCLE_S = 3600
_MAPPING_COLUMNS = ", ".join(f"m.{field}" for field in _LOOKUP_FIELDS)
_LOOKUP_COLUMNS = f"{_MAPPING_COLUMNS}, j.reply"
#: A lone lookup (on its job's critical path, where MariaDB's CPU adds to the latency: it
#: runs on the worker's core while the worker's send() wakes it): the mapping by its key,
#: the job's record as a subquery of its row, 10-20 µs less of MariaDB's CPU than joining
#: both to a one-row table. Parameters: node, job_id, node, vm_id, disk. No mapping, no
#: row: then _RECORD_ONLY (a new disk's first job, or a job for a disk never prepared).
_LOOKUP_ONE = (
    f"SELECT JSON_ARRAY(0, {_MAPPING_COLUMNS}, "  # noqa: S608
    "(SELECT j.reply FROM export_jobs AS j WHERE j.node_id = %s AND j.job_id = %s)) "
    "FROM vm_export_mappings AS m "
    "WHERE m.node_id = %s AND m.vm_id = %s AND m.disk_unit_number = %s"
)
_RECORD_ONLY = "SELECT reply FROM export_jobs WHERE node_id = %s AND job_id = %s"


@functools.lru_cache(maxsize=LOOKUP_BATCH)
def _lookup_statement(keys: int) -> str:
    """The lookup of two or more keys: a JSON array per key, led by the key's index in a
    derived table of the keys (one statement for the keys asked at once)."""
    return (
        f"SELECT JSON_ARRAY(q.i, {_LOOKUP_COLUMNS}) FROM "  # noqa: S608
        "(SELECT 0 AS i, %s AS vm_id, %s AS disk, %s AS job_id"
        + "".join(f" UNION ALL SELECT {i}, %s, %s, %s" for i in range(1, keys))
        + ") AS q LEFT JOIN vm_export_mappings AS m ON m.node_id = %s "
        "AND m.vm_id = q.vm_id AND m.disk_unit_number = q.disk "
        "LEFT JOIN export_jobs AS j ON j.node_id = %s AND j.job_id = q.job_id"
    )


_USAGE_FIELDS = (
    "export_name", "prepared_at", "connections_total", "bytes_written", "bytes_read",
    "ended_written", "ended_read", "last_io_at", "event_seq", "open_connections",
)  # fmt: skip
_USAGE_COLUMNS = ", ".join(_USAGE_FIELDS)


#: A lease deadline from the database's clock: NULL without a lease (the parameter).
_DEADLINE = "IF(%s IS NULL, NULL, CURRENT_TIMESTAMP(6) + INTERVAL %s SECOND)"
#: The same, renewed by the row's own lease length.
_DEADLINE_OWN = "IF(lease_s IS NULL, NULL, CURRENT_TIMESTAMP(6) + INTERVAL lease_s SECOND)"


def _utc(value: datetime) -> datetime:
    """A TIMESTAMP as the driver returns it (naive, in the session's time zone: UTC, set
    at connect) as an aware datetime."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    """Driver errors raised inside as the worker's (translate_error); an IntegrityError
    passes as it is, for the statement that expects a duplicate key to tell which."""
    try:
        yield
    except pymysql.err.IntegrityError:
        raise
    except pymysql.MySQLError as exc:
        raise translate_error(exc) from exc


def _reusable(conn: aiomysql.Connection) -> bool:
    """Whether a held connection may run the next statement: the checks aiomysql's pool
    makes of a free connection before handing it out (closed by the server, failed, idle
    past the recycle time)."""
    reader = conn._reader  # what the pool itself looks at
    return not (
        conn.closed
        or reader.at_eof()
        or reader.exception() is not None
        or getattr(reader, "eof_received", False)
        or asyncio.get_running_loop().time() - conn.last_usage > RECYCLE_S
    )


def _is_duplicate(exc: pymysql.err.IntegrityError, key: str) -> bool:
    """Whether `exc` is a duplicate entry on a unique key whose name contains `key`."""
    return bool(exc.args) and exc.args[0] == ER_DUP_ENTRY and key in str(exc.args[-1])


def translate_error(exc: pymysql.MySQLError) -> WorkerError:
    """Maps a driver error onto the worker's tree: transient ones may be retried."""
    errno = exc.args[0] if exc.args and isinstance(exc.args[0], int) else 0
    # The server's own words: they name tables, keys and hosts, never passwords.
    text = str(exc.args[1]) if len(exc.args) > 1 else type(exc).__name__
    if isinstance(exc.__cause__, ssl.SSLError):
        # "Can't connect" hides why. A certificate the CA did not sign, or for another
        # name, is a configuration error, not an outage: not retried.
        text += f": TLS failed: {exc.__cause__}"
        if isinstance(exc.__cause__, ssl.SSLCertVerificationError):
            return DatabaseError(text, errno)
    # Which numbers are retried, and why each (Galera's conflicts too): worker/db_errors.py.
    # A conflict is retried at once, by the statement itself; the other transient ones are
    # left to the job's retries, which wait longer: retrying them in both places would
    # multiply the tries and their timeouts.
    kind = classify_errno(errno)
    if kind is ErrnoKind.CONFLICT:
        return TransactionConflict(f"database error {errno} (transient): {text}")
    if kind is ErrnoKind.TRANSIENT:
        return TransientDatabaseError(f"database error {errno} (transient): {text}")
    return DatabaseError(text, errno)


def retry_policy(
    *, attempts: int = 5, max_wait_s: float = 2.0, on_retry: Callable[[], None] | None = None
) -> AsyncRetrying:
    """Retries one transaction on conflicts: exponential backoff with full jitter,
    at most `attempts` tries; `on_retry` is called before each new try (to count it)."""

    def log_retry(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning("Retrying database transaction attempt=%d error=%s", state.attempt_number, exc)
        if on_retry is not None:
            on_retry()

    return AsyncRetrying(
        stop=stop_after_attempt(attempts),
        wait=wait_random_exponential(multiplier=0.02, max=max_wait_s),
        retry=retry_if_exception(lambda e: isinstance(e, TransactionConflict)),
        before_sleep=log_retry,
        reraise=True,
    )


def database_name(url: AnyUrl) -> str:
    name = (url.path or "").lstrip("/")
    if not _DB_NAME_RE.fullmatch(name):
        raise ValueError("the database URL must name a database of letters, digits and _")
    return name


def _connect_args(url: AnyUrl, timeout_s: float, tls: ssl.SSLContext | None) -> dict[str, Any]:
    if tls is not None:
        refuse_plaintext_logins()
    return {
        "host": url.host or "127.0.0.1",
        "port": url.port or 3306,
        "user": url.username or "root",
        "password": url.password or "",
        "connect_timeout": timeout_s,
        "charset": "utf8mb4",
        "ssl": tls,
        # TIMESTAMP columns are read and written in UTC, whatever the server's zone.
        "init_command": "SET time_zone = '+00:00'",
    }


async def _check_encrypted(conn: Any, url: AnyUrl) -> None:
    """Raises DatabaseError unless the session is encrypted, as the server says."""
    try:
        cipher = await session_cipher(conn)
    except pymysql.MySQLError as exc:
        raise translate_error(exc) from exc
    if not cipher:
        raise DatabaseError(
            f"the session with the database at {url.host}:{url.port or 3306} is not "
            "encrypted although TLS is required"
        )


class Repository:
    """The worker's view of the database. Create with `Repository.connect`."""

    def __init__(
        self,
        pool: aiomysql.Pool,
        node_id: str,
        on_retry: Callable[[], None] | None = None,
        *,
        client_addresses: tuple[str, ...] = DEFAULT_CLIENT_ADDRESSES,
    ) -> None:
        self._pool = pool
        self._node = node_id
        self._on_retry = on_retry
        #: What a NULL client_addresses (a row from before access control) reads as: the
        #: worker's default, resolved here once, so nothing above this module sees NULL.
        self._default_stored = stored_addresses(client_addresses)
        self._lookups: Coalescer[tuple[str, int, str], tuple[Mapping | None, JobRecord | None]]
        self._lookups = Coalescer(
            self._lookup_many, limit=LOOKUP_STATEMENTS, max_batch=LOOKUP_BATCH
        )
        #: The connection lookups run on, kept between them: the coalescer runs one lookup
        #: statement at a time, and the pool's acquire and release (a condition, a scan of
        #: every free connection) cost a lone reuse ~25 µs on its critical path. Only with
        #: a pool of two or more (the other statements need a connection of their own),
        #: and while lookups run one statement at a time (two would share the connection).
        self._held: aiomysql.Connection | None = None
        self._hold_lookups = pool.maxsize >= 2 and LOOKUP_STATEMENTS == 1

    def _row_to_mapping(self, row: tuple[Any, ...]) -> Mapping:
        # The columns' SQL types already are the fields' types: no validation on the hot path.
        values = list(row)
        values[_CLIENT_ADDRESSES] = resolve_stored(values[_CLIENT_ADDRESSES], self._default_stored)
        for index in _UTC_COLUMNS:
            if values[index] is not None:
                values[index] = _utc(values[index])
        return mapping_of_row(dict(zip(_FIELDS, values, strict=True)))

    @classmethod
    async def connect(
        cls,
        url: AnyUrl,
        *,
        node_id: str,
        pool_size: int,
        timeout_s: float,
        on_retry: Callable[[], None] | None = None,
        tls: ssl.SSLContext | None = None,
        client_addresses: tuple[str, ...] = DEFAULT_CLIENT_ADDRESSES,
    ) -> Repository:
        """`tls`: every connection over TLS; a server that offers none is refused before
        login, and the first session is checked to be encrypted. `client_addresses`: whom
        rows from before access control admit (EXPORT_WORKER_CLIENT_ADDRESSES)."""
        try:
            pool = await aiomysql.create_pool(
                minsize=1,
                maxsize=pool_size,
                db=database_name(url),
                autocommit=True,
                pool_recycle=RECYCLE_S,
                **_connect_args(url, timeout_s, tls),
            )
        except pymysql.MySQLError as exc:
            raise translate_error(exc) from exc
        if tls is not None:
            try:
                try:
                    async with pool.acquire() as conn:
                        await _check_encrypted(conn, url)
                except pymysql.MySQLError as exc:
                    raise translate_error(exc) from exc
            except BaseException:
                pool.close()
                await pool.wait_closed()
                raise
        return cls(pool, node_id, on_retry, client_addresses=client_addresses)

    async def close(self) -> None:
        self._drop_held()
        self._pool.close()
        await self._pool.wait_closed()

    @contextlib.asynccontextmanager
    async def _cursor(self, *, transaction: bool = False) -> AsyncIterator[Any]:
        with _translated():
            conn = await self._pool.acquire()
            try:
                if transaction:
                    await conn.begin()
                try:
                    async with conn.cursor() as cur:
                        yield cur
                    if transaction:
                        await conn.commit()
                except BaseException:
                    if transaction:
                        with contextlib.suppress(Exception):
                            await conn.rollback()
                    raise
            finally:
                # Not awaited: release() returns a task that wakes whoever waits for a
                # connection, and awaiting it would cost every statement a turn of the
                # event loop (the loop runs the task by itself).
                self._pool.release(conn)

    @contextlib.asynccontextmanager
    async def _lookup_cursor(self) -> AsyncIterator[Any]:
        """_cursor() for a lookup, on the held connection (kept while it answers): one
        lookup at a time uses it (the coalescer's limit)."""
        if not self._hold_lookups:
            async with self._cursor() as cur:
                yield cur
            return
        conn = self._held
        if conn is not None and not _reusable(conn):
            self._drop_held()
            conn = None
        with _translated():
            try:
                if conn is None:
                    conn = self._held = await self._pool.acquire()
                async with conn.cursor() as cur:
                    yield cur
            except BaseException:
                # A failed or cancelled statement may leave the connection mid-reply: a
                # new one for the next lookup.
                self._drop_held()
                raise

    def _drop_held(self) -> None:
        conn, self._held = self._held, None
        if conn is not None:
            conn.close()
            self._pool.release(conn)  # a closed connection leaves the pool

    async def _retrying(self, fn: Callable[[], Awaitable[T]]) -> T:
        return await call_with_retries(
            fn,
            lambda: retry_policy(on_retry=self._on_retry),
            lambda exc: isinstance(exc, TransactionConflict),
        )

    async def lookup(
        self, vm_id: str, disk_unit_number: int, job_id: str
    ) -> tuple[Mapping | None, JobRecord | None]:
        """The (vm, disk)'s mapping and the job's record, if any: one round trip, two
        point lookups, so checking for a redelivered job costs the reuse path nothing.
        Lookups asked while others are in flight share the next statement (coalesce.py)."""
        return await self._lookups.get((vm_id, disk_unit_number, job_id))

    async def _lookup_many(
        self, keys: list[tuple[str, int, str]]
    ) -> list[tuple[Mapping | None, JobRecord | None]]:
        """lookup() for each of `keys`, in one statement: a row per key, found by the index
        of its key in `keys` (the first element of its JSON array)."""
        if len(keys) == 1:
            return [await self._retrying(lambda: self._lookup_one(keys[0]))]
        params = [value for key in keys for value in key] + [self._node, self._node]
        statement = _lookup_statement(len(keys))

        async def query() -> list[tuple[Mapping | None, JobRecord | None]]:
            async with self._lookup_cursor() as cur:
                await cur.execute(statement, params)
                rows = await cur.fetchall()
            found: list[tuple[Mapping | None, JobRecord | None] | None] = [None] * len(keys)
            for (row,) in rows:
                if row is None:
                    # JSON_ARRAY gives NULL only past max_allowed_packet: never for our rows.
                    raise DatabaseError("the mapping lookup returned no row")
                values = json.loads(row)
                index = values[0]
                found[index] = self._looked_up(keys[index], values[1:])
            if any(result is None for result in found):
                raise DatabaseError("the mapping lookup returned no row for a key")
            return found  # type: ignore[return-value]  # every entry set, checked above

        return await self._retrying(query)

    async def _lookup_one(
        self, key: tuple[str, int, str]
    ) -> tuple[Mapping | None, JobRecord | None]:
        """lookup() of one key, asked alone (_LOOKUP_ONE)."""
        (vm_id, disk, job_id), node = key, self._node
        async with self._lookup_cursor() as cur:
            await cur.execute(_LOOKUP_ONE, (node, job_id, node, vm_id, disk))
            row = await cur.fetchone()
            if row is None:
                await cur.execute(_RECORD_ONLY, (node, job_id))
                stored = await cur.fetchone()
                return self._looked_up(key, [None] * len(_LOOKUP_FIELDS) + [stored and stored[0]])
        if row[0] is None:
            raise DatabaseError("the mapping lookup returned no row")  # see _lookup_many
        return self._looked_up(key, json.loads(row[0])[1:])

    def _looked_up(
        self, key: tuple[str, int, str], values: list[Any]
    ) -> tuple[Mapping | None, JobRecord | None]:
        """One key's mapping and job record from its row's JSON array."""
        vm_id, disk_unit_number, job_id = key
        mapping = None
        if values[0] is not None:  # the primary key: NULL only when no row joined
            fields = dict(zip(_LOOKUP_FIELDS, values[:-1], strict=True))
            fields["node_id"] = self._node
            fields["vm_id"] = vm_id
            fields["disk_unit_number"] = disk_unit_number
            fields["client_addresses"] = resolve_stored(
                fields["client_addresses"], self._default_stored
            )
            for name in _LOOKUP_TIMES:
                if fields[name] is not None:
                    fields[name] = datetime.fromisoformat(fields[name]).replace(tzinfo=UTC)
            mapping = mapping_of_row(fields)
        record = None
        if values[-1] is not None:
            # TEXT arrives as a JSON string; a JSON-typed column would arrive embedded.
            stored = values[-1]
            reply = json.loads(stored) if isinstance(stored, str) else stored
            record = JobRecord(
                job_id=job_id,
                vm_id=reply["vm_id"],
                disk_unit_number=reply["disk_unit_number"],
                reply=reply,
            )
        return mapping, record

    async def record_jobs(self, records: list[JobRecord]) -> None:
        """Stores answered jobs (one statement for many). A record already there wins: the
        first answer is the one every redelivery repeats."""
        if not records:
            return
        rows = ", ".join(["(%s, %s, %s, %s, %s)"] * len(records))
        params: list[Any] = []
        for record in records:
            params += [
                self._node,
                record.job_id,
                record.vm_id,
                record.disk_unit_number,
                json.dumps(record.reply, separators=(",", ":")),
            ]

        # A reuse's generation reaches its mapping with its record (flow.py's _reuse).
        generations: dict[tuple[str, int], int] = {}
        for record in records:
            generation = record.reply.get("generation")
            if record.reply.get("status") == "ready" and isinstance(generation, int):
                key = (record.vm_id, record.disk_unit_number)
                generations[key] = max(generation, generations.get(key, 0))

        async def insert() -> None:
            async with self._cursor(transaction=bool(generations)) as cur:
                await cur.execute(
                    # Not INSERT IGNORE: that would also hide errors other than duplicates.
                    "INSERT INTO export_jobs "  # noqa: S608 - placeholders only
                    f"(node_id, job_id, vm_id, disk_unit_number, reply) VALUES {rows} "
                    "ON DUPLICATE KEY UPDATE job_id = job_id",
                    params,
                )
                if generations:
                    # One statement for the batch (a statement per record cost the reuse
                    # path a third of MariaDB's CPU in the benchmark).
                    bumps = " UNION ALL ".join(
                        ["SELECT %s AS vm_id, %s AS disk_unit_number, %s AS generation"]
                        + ["SELECT %s, %s, %s"] * (len(generations) - 1)
                    )
                    values = [
                        v for (vm, disk), g in sorted(generations.items()) for v in (vm, disk, g)
                    ]
                    await cur.execute(
                        "UPDATE vm_export_mappings AS m JOIN "  # noqa: S608 - placeholders only
                        f"({bumps}) AS b "
                        "ON m.node_id = %s AND m.vm_id = b.vm_id "
                        "AND m.disk_unit_number = b.disk_unit_number "
                        "SET m.generation = GREATEST(m.generation, b.generation)",
                        [*values, self._node],
                    )

        await self._retrying(insert)

    async def prune_jobs(self, older_than_s: float) -> int:
        """Deletes job records older than `older_than_s` seconds; how many it deleted."""

        async def delete() -> int:
            async with self._cursor() as cur:
                await cur.execute(
                    "DELETE FROM export_jobs WHERE node_id = %s "
                    "AND created_at < NOW(6) - INTERVAL %s MICROSECOND",
                    (self._node, int(older_than_s * 1_000_000)),
                )
                return int(cur.rowcount)

        return await self._retrying(delete)

    async def find_active_by_device(self, device_id: str) -> Mapping | None:
        """The active mapping serving this device, whatever path it was named by."""

        async def query() -> Mapping | None:
            async with self._cursor() as cur:
                await cur.execute(
                    f"SELECT {_COLUMNS} FROM vm_export_mappings "  # noqa: S608 - fixed columns
                    "WHERE node_id = %s AND active_device_id = %s",
                    (self._node, device_id),
                )
                row = await cur.fetchone()
            return self._row_to_mapping(row) if row else None

        return await self._retrying(query)

    async def committed_export(self, export_name: str) -> CommittedExport | None:
        """What an active mapping commits this export to (its device, who may connect),
        or None."""

        async def query() -> CommittedExport | None:
            async with self._cursor() as cur:
                await cur.execute(
                    "SELECT device_path, client_addresses, fenced_at IS NOT NULL "
                    "FROM vm_export_mappings "
                    "WHERE node_id = %s AND export_name = %s AND status = 'active'",
                    (self._node, export_name),
                )
                row = await cur.fetchone()
            if not row:
                return None
            return CommittedExport(
                device_path=str(row[0]),
                client_addresses=resolve_stored(row[1], self._default_stored),
                fenced=bool(row[2]),
            )

        return await self._retrying(query)

    async def set_client_addresses(
        self, vm_id: str, disk_unit_number: int, client_addresses: str
    ) -> None:
        """Changes who may connect to an active mapping's export (a reuse with other
        addresses)."""

        async def update() -> None:
            async with self._cursor() as cur:
                await cur.execute(
                    "UPDATE vm_export_mappings SET client_addresses = %s "
                    "WHERE node_id = %s AND vm_id = %s AND disk_unit_number = %s "
                    "AND status = 'active'",
                    (client_addresses, self._node, vm_id, disk_unit_number),
                )

        await self._retrying(update)

    async def restore(self, mapping: Mapping, claimed_device_id: str) -> bool:
        """Puts a row back as `mapping` had it, undoing this job's claim of
        `claimed_device_id` whose export failed. Only if the row still is as the claim left
        it (no newer job changed or released it) and the old device is still free: returns
        whether it did."""

        async def update() -> bool:
            try:
                async with self._cursor() as cur:
                    await cur.execute(
                        "UPDATE vm_export_mappings SET vm_name = %s, device_path = %s, "
                        "device_id = %s, status = %s, last_job_id = %s, last_action = %s, "
                        "client_addresses = %s "
                        "WHERE id = %s AND status = 'active' AND device_id = %s",
                        (
                            mapping.vm_name,
                            mapping.device_path,
                            mapping.device_id,
                            mapping.status,
                            mapping.last_job_id,
                            mapping.last_action,
                            mapping.client_addresses,
                            mapping.id,
                            claimed_device_id,
                        ),
                    )
                    return bool(cur.rowcount)
            except pymysql.err.IntegrityError as exc:
                if _is_duplicate(exc, "active_device_id"):
                    return False  # another mapping has taken the old device meanwhile
                raise translate_error(exc) from exc

        return await self._retrying(update)

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
        """Makes the request's mapping active with its device and who may connect to it,
        inserting or updating its row, and names the job and its `action` in it.

        The unique index on active devices is the arbiter between concurrent jobs and worker
        processes: raises DeviceInUse, with nothing changed, when another active mapping
        holds the device. Returns the export's new generation (past `after` too: the last
        one this process answered; the same one when the job `resumes` its own claim, so
        that every delivery of a job answers alike) and lease deadline.
        """
        device_id = device.device_id
        lease = lease or Lease()
        params = (
            request.vm_name,
            request.export_name,
            device.path,
            device_id,
            request.job_id,
            action,
            client_addresses,
            request.planned_bytes,
            self._node,
            request.vm_id,
            request.disk_unit_number,
        )

        async def insert_or_update() -> None:
            # Two single statements in autocommit, not SELECT ... FOR UPDATE then INSERT:
            # that takes gap locks, and a burst of creates then deadlocks (error 1213, about
            # one in ten in a 200-job burst: nbd-server-facts.md). Not ON DUPLICATE KEY
            # UPDATE either: it would also fire on the device key and overwrite another
            # VM's row.
            try:
                async with self._cursor() as cur:
                    await cur.execute(
                        "INSERT INTO vm_export_mappings (vm_name, export_name, device_path, "  # noqa: S608
                        "device_id, last_job_id, last_action, client_addresses, planned_bytes, "
                        "node_id, vm_id, disk_unit_number, status, prepared_at, generation, "
                        f"lease_s, idle_timeout_s, lease_expires_at) "
                        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, 'active', "
                        f"CURRENT_TIMESTAMP(6), %s, %s, %s, {_DEADLINE})",
                        (*params, after + 1, lease.lease_s, lease.idle_timeout_s, *lease.deadline),
                    )
            except pymysql.err.IntegrityError as exc:
                if not _is_duplicate(exc, "vm_disk"):
                    await self._raise_claim_error(exc, device)
            else:
                return
            # The row exists (an earlier job, or another worker just now): update it.
            try:
                async with self._cursor() as cur:
                    await cur.execute(
                        # A new prepare-export starts a new copy: an earlier flush failure
                        # no longer speaks for what will be written. An inactive row made
                        # active is a new copy (prepared now, its plan only the job's); a
                        # relink or recreate goes on with the same one. MariaDB assigns left
                        # to right: prepared_at and planned_bytes read the old status.
                        "UPDATE vm_export_mappings SET vm_name = %s, export_name = %s, "  # noqa: S608
                        "device_path = %s, device_id = %s, last_job_id = %s, last_action = %s, "
                        "client_addresses = %s, "
                        "planned_bytes = IF(status = 'active', COALESCE(%s, planned_bytes), %s), "
                        "prepared_at = IF(status = 'active' AND prepared_at IS NOT NULL, "
                        "prepared_at, CURRENT_TIMESTAMP(6)), "
                        "status = 'active', flush_error = NULL, "
                        "generation = GREATEST(generation, %s) + %s, lease_s = %s, "
                        "idle_timeout_s = %s, "
                        f"lease_expires_at = {_DEADLINE}, fenced_at = NULL "
                        "WHERE node_id = %s AND vm_id = %s AND disk_unit_number = %s",
                        (
                            *params[:8],
                            request.planned_bytes,
                            after,
                            0 if resumes else 1,
                            lease.lease_s,
                            lease.idle_timeout_s,
                            *lease.deadline,
                            *params[8:],
                        ),
                    )
            except pymysql.err.IntegrityError as exc:
                await self._raise_claim_error(exc, device)

        await self._retrying(insert_or_update)
        return await self._claimed(request.vm_id, request.disk_unit_number)

    async def _claimed(self, vm_id: str, disk_unit_number: int) -> Claimed:
        async def query() -> Claimed:
            async with self._cursor() as cur:
                await cur.execute(
                    "SELECT generation, lease_expires_at FROM vm_export_mappings "
                    "WHERE node_id = %s AND vm_id = %s AND disk_unit_number = %s",
                    (self._node, vm_id, disk_unit_number),
                )
                row = await cur.fetchone()
            if row is None:
                raise DatabaseError(f"the mapping of vm {vm_id} disk {disk_unit_number} is gone")
            return Claimed(int(row[0]), _utc(row[1]) if row[1] is not None else None)

        return await self._retrying(query)

    async def renew(
        self, vm_id: str, disk_unit_number: int, lease: Lease | None = None
    ) -> Claimed | None:
        """A reuse (`lease` given): the next generation, the lease set anew from `lease`.
        A flush or an inspect with renew (None): the lease renewed by its own length,
        unless the export is fenced. None when the row is not active (or fenced)."""

        where = (self._node, vm_id, disk_unit_number)

        async def update() -> Claimed | None:
            async with self._cursor() as cur:
                if lease is not None:
                    await cur.execute(
                        "UPDATE vm_export_mappings SET "  # noqa: S608 - fixed text, placeholders
                        "generation = LAST_INSERT_ID(generation + 1), lease_s = %s, "
                        f"idle_timeout_s = %s, lease_expires_at = {_DEADLINE} "
                        "WHERE node_id = %s AND vm_id = %s AND disk_unit_number = %s "
                        "AND status = 'active'",
                        [lease.lease_s, lease.idle_timeout_s, *lease.deadline, *where],
                    )
                else:
                    await cur.execute(
                        "UPDATE vm_export_mappings SET generation = LAST_INSERT_ID(generation), "  # noqa: S608
                        f"lease_expires_at = {_DEADLINE_OWN} "
                        "WHERE node_id = %s AND vm_id = %s AND disk_unit_number = %s "
                        "AND status = 'active' AND fenced_at IS NULL",
                        (self._node, vm_id, disk_unit_number),
                    )
                generation = int(cur.lastrowid or 0)
            if not generation:
                return None
            if lease is not None and lease.lease_s is None:
                return Claimed(generation, None)  # no lease: no second round trip
            return await self._claimed(vm_id, disk_unit_number)

        return await self._retrying(update)

    async def fence(self, vm_id: str, disk_unit_number: int) -> None:
        """The export admits nobody from now on (its authfile is written from the row)."""

        async def update() -> None:
            async with self._cursor() as cur:
                await cur.execute(
                    "UPDATE vm_export_mappings SET fenced_at = "
                    "COALESCE(fenced_at, CURRENT_TIMESTAMP(6)) "
                    "WHERE node_id = %s AND vm_id = %s AND disk_unit_number = %s "
                    "AND status = 'active'",
                    (self._node, vm_id, disk_unit_number),
                )

        await self._retrying(update)

    async def unfence(self, vm_id: str, disk_unit_number: int) -> None:
        """A new prepare-export lifts a fence."""

        async def update() -> None:
            async with self._cursor() as cur:
                await cur.execute(
                    "UPDATE vm_export_mappings SET fenced_at = NULL "
                    "WHERE node_id = %s AND vm_id = %s AND disk_unit_number = %s",
                    (self._node, vm_id, disk_unit_number),
                )

        await self._retrying(update)

    async def _raise_claim_error(self, exc: pymysql.err.IntegrityError, device: Device) -> NoReturn:
        if _is_duplicate(exc, "active_device_id"):
            holder = await self.find_active_by_device(device.device_id)
            by = f"export {holder.export_name}" if holder else "another active mapping"
            raise DeviceInUse(f"device {device.path} is already served by {by}") from exc
        raise translate_error(exc) from exc

    async def list_mappings(
        self, *, active_only: bool = False, node_id: str | None = None, all_nodes: bool = False
    ) -> list[Mapping]:
        """This node's mappings (or `node_id`'s, or every node's with all_nodes)."""
        clauses, params = [], []
        if not all_nodes:
            clauses.append("node_id = %s")
            params.append(node_id or self._node)
        if active_only:
            clauses.append("status = 'active'")
        where = f"WHERE {' AND '.join(clauses)} " if clauses else ""

        async def query() -> list[Mapping]:
            async with self._cursor() as cur:
                await cur.execute(
                    f"SELECT {_COLUMNS} FROM vm_export_mappings {where}"  # noqa: S608
                    "ORDER BY node_id, vm_id, disk_unit_number",
                    params,
                )
                return [self._row_to_mapping(row) for row in await cur.fetchall()]

        return await self._retrying(query)

    async def active_export_names(self) -> list[str]:
        """This node's active exports, by name only (housekeeping runs it every few
        seconds: whole rows would cost it a parse of every column)."""

        async def query() -> list[str]:
            async with self._cursor() as cur:
                await cur.execute(
                    "SELECT export_name FROM vm_export_mappings "
                    "WHERE node_id = %s AND status = 'active'",
                    (self._node,),
                )
                return [str(row[0]) for row in await cur.fetchall()]

        return await self._retrying(query)

    async def deactivate(
        self, vm_id: str, disk_unit_number: int, job_id: str, *, flushed: bool
    ) -> Mapping | None:
        """Marks the mapping inactive (its device is free again), naming the releasing job
        and whether it fsynced the device first; the row, or None."""

        async def transaction() -> Mapping | None:
            async with self._cursor(transaction=True) as cur:
                await cur.execute(
                    "UPDATE vm_export_mappings SET status = 'inactive', last_job_id = %s, "
                    "last_action = %s "
                    "WHERE node_id = %s AND vm_id = %s AND disk_unit_number = %s",
                    (
                        job_id,
                        "released-flushed" if flushed else "released",
                        self._node,
                        vm_id,
                        disk_unit_number,
                    ),
                )
                await cur.execute(
                    f"SELECT {_COLUMNS} FROM vm_export_mappings "  # noqa: S608
                    "WHERE node_id = %s AND vm_id = %s AND disk_unit_number = %s",
                    (self._node, vm_id, disk_unit_number),
                )
                row = await cur.fetchone()
            return self._row_to_mapping(row) if row else None

        return await self._retrying(transaction)

    async def set_flush_error(
        self, vm_id: str, disk_unit_number: int, flush_error: str | None
    ) -> None:
        """Records why fsync of the mapping's device failed, or (None) clears it."""

        async def update() -> None:
            async with self._cursor() as cur:
                await cur.execute(
                    "UPDATE vm_export_mappings SET flush_error = %s "
                    "WHERE node_id = %s AND vm_id = %s AND disk_unit_number = %s",
                    (flush_error, self._node, vm_id, disk_unit_number),
                )

        await self._retrying(update)

    async def settle_answer(
        self, vm_id: str, disk_unit_number: int, job_id: str, last_action: str
    ) -> str | None:
        """Settles the answer of job `job_id`'s claim: `last_action` unless a delivery of
        the same job settled it already; the settled answer (None: the row is no longer
        that job's claim)."""
        where = (self._node, vm_id, disk_unit_number, job_id)

        async def update() -> str | None:
            async with self._cursor() as cur:
                await cur.execute(
                    "UPDATE vm_export_mappings SET last_action = IF(last_action LIKE %s, "
                    "last_action, %s) WHERE node_id = %s AND vm_id = %s AND "
                    "disk_unit_number = %s AND last_job_id = %s",
                    [f"%{SETTLED_MARK}", last_action + SETTLED_MARK, *where],
                )
                await cur.execute(
                    "SELECT last_action FROM vm_export_mappings WHERE node_id = %s AND "
                    "vm_id = %s AND disk_unit_number = %s AND last_job_id = %s",
                    where,
                )
                row = await cur.fetchone()
            return None if row is None or row[0] is None else str(row[0])

        return await self._retrying(update)

    async def set_planned_bytes(self, vm_id: str, disk_unit_number: int, planned: int) -> None:
        """What the scheduler now plans to write through the export (progress)."""

        async def update() -> None:
            async with self._cursor() as cur:
                await cur.execute(
                    "UPDATE vm_export_mappings SET planned_bytes = %s "
                    "WHERE node_id = %s AND vm_id = %s AND disk_unit_number = %s",
                    (planned, self._node, vm_id, disk_unit_number),
                )

        await self._retrying(update)

    async def tracked_exports(self, link_for: Callable[[str], Path], tls: bool) -> list[Tracked]:
        """This node's active exports as the live view follows them; rows from before
        prepared_at count from their creation."""

        async def query() -> list[Tracked]:
            async with self._cursor() as cur:
                await cur.execute(
                    "SELECT export_name, vm_id, disk_unit_number, "
                    "COALESCE(prepared_at, created_at), planned_bytes "
                    "FROM vm_export_mappings WHERE node_id = %s AND status = 'active'",
                    (self._node,),
                )
                rows = await cur.fetchall()
            return [
                Tracked(
                    export_name=name,
                    vm_id=vm_id,
                    disk_unit_number=disk,
                    link=link_for(name),
                    tls=tls,
                    prepared_at=_utc(prepared_at),
                    planned_bytes=planned,
                )
                for name, vm_id, disk, prepared_at, planned in rows
            ]

        return await self._retrying(query)

    async def kept_usage(self) -> dict[str, Usage]:
        """What the live view kept of this node's exports (export_usage), by name."""

        async def query() -> dict[str, Usage]:
            async with self._cursor() as cur:
                await cur.execute(
                    f"SELECT {_USAGE_COLUMNS} FROM export_usage "  # noqa: S608
                    "WHERE node_id = %s",
                    (self._node,),
                )
                rows = await cur.fetchall()
            kept = {}
            for row in rows:
                fields = dict(zip(_USAGE_FIELDS, row, strict=True))
                fields["prepared_at"] = _utc(fields["prepared_at"])
                if fields["last_io_at"] is not None:
                    fields["last_io_at"] = _utc(fields["last_io_at"])
                fields["open_connections"] = tuple(
                    (int(pid), int(ticks), int(written), int(read))
                    for pid, ticks, written, read in json.loads(fields["open_connections"])
                )
                kept[fields["export_name"]] = Usage(**fields)
            return kept

        return await self._retrying(query)

    async def keep_usage(self, usage: list[Usage]) -> None:
        """Writes what the live view counted (one statement for many exports)."""
        if not usage:
            return
        rows = ", ".join([f"(%s, {', '.join(['%s'] * len(_USAGE_FIELDS))})"] * len(usage))
        params: list[Any] = []
        for u in usage:
            params.append(self._node)
            for name in _USAGE_FIELDS:
                value = getattr(u, name)
                if name == "open_connections":
                    value = json.dumps([list(c) for c in value])
                elif isinstance(value, datetime):
                    value = value.astimezone(UTC).replace(tzinfo=None)
                params.append(value)
        updates = ", ".join(f"{name} = VALUES({name})" for name in _USAGE_FIELDS)

        async def upsert() -> None:
            async with self._cursor() as cur:
                await cur.execute(
                    f"INSERT INTO export_usage (node_id, {_USAGE_COLUMNS}) "  # noqa: S608
                    f"VALUES {rows} ON DUPLICATE KEY UPDATE {updates}",
                    params,
                )

        await self._retrying(upsert)

    async def due_for_expiry(self, notice_s: float) -> list[tuple[Mapping, datetime]]:
        """This node's active mappings whose lease ends within `notice_s` (or has ended), or
        that have an idle timeout, each with the database's time now."""

        async def query() -> list[tuple[Mapping, datetime]]:
            async with self._cursor() as cur:
                await cur.execute(
                    f"SELECT {_COLUMNS}, CURRENT_TIMESTAMP(6) FROM vm_export_mappings "  # noqa: S608
                    "WHERE node_id = %s AND status = 'active' AND (idle_timeout_s IS NOT NULL "
                    "OR lease_expires_at <= CURRENT_TIMESTAMP(6) + INTERVAL %s SECOND)",
                    (self._node, notice_s),
                )
                rows = await cur.fetchall()
            return [(self._row_to_mapping(row[:-1]), _utc(row[-1])) for row in rows]

        return await self._retrying(query)

    async def add_events(self, events: list[OutboxEvent]) -> None:
        """Writes lease events to the outbox. One already there and ready keeps its body (a
        repeat says the same); one not ready yet takes this body, and becomes ready if this
        one is."""
        if not events:
            return
        rows = ", ".join(["(%s, %s, %s, %s, %s, %s)"] * len(events))
        params: list[Any] = []
        for e in events:
            params += [self._node, e.export_name, e.kind, e.ref, e.body, int(e.ready)]

        async def insert() -> None:
            async with self._cursor() as cur:
                await cur.execute(
                    "INSERT INTO export_events (node_id, export_name, kind, ref, body, ready) "  # noqa: S608
                    f"VALUES {rows} ON DUPLICATE KEY UPDATE "
                    # Left to right: the body reads the old `ready`. Once ready, it is final.
                    "body = IF(ready, body, VALUES(body)), ready = GREATEST(ready, VALUES(ready))",
                    params,
                )

        await self._retrying(insert)

    async def outbox(self, *, ready: bool) -> list[OutboxEvent]:
        """This node's unpublished lease events, ready ones or those still waiting for the
        step they announce, oldest first."""

        async def query() -> list[OutboxEvent]:
            async with self._cursor() as cur:
                await cur.execute(
                    "SELECT export_name, kind, ref, body FROM export_events "
                    "WHERE node_id = %s AND published_at IS NULL AND ready = %s "
                    "ORDER BY created_at LIMIT 500",
                    (self._node, int(ready)),
                )
                rows = await cur.fetchall()
            return [OutboxEvent(str(n), str(k), str(r), str(b), ready) for n, k, r, b in rows]

        return await self._retrying(query)

    async def drop_event(self, event: OutboxEvent) -> None:
        """An outbox event whose step never happened (the export was prepared again)."""

        async def delete() -> None:
            async with self._cursor() as cur:
                await cur.execute(
                    "DELETE FROM export_events "
                    "WHERE node_id = %s AND export_name = %s AND kind = %s AND ref = %s",
                    (self._node, event.export_name, event.kind, event.ref),
                )

        await self._retrying(delete)

    async def event_published(self, event: OutboxEvent) -> None:
        async def update() -> None:
            async with self._cursor() as cur:
                await cur.execute(
                    "UPDATE export_events SET published_at = CURRENT_TIMESTAMP(6) "
                    "WHERE node_id = %s AND export_name = %s AND kind = %s AND ref = %s",
                    (self._node, event.export_name, event.kind, event.ref),
                )

        await self._retrying(update)

    async def add_checksum(self, job: ChecksumJob) -> bool:
        """Records an accepted checksum-export; False when its job_id was recorded before
        (a redelivery or a duplicate: it runs already). Then, while it runs, its reply goes
        to this delivery's reply_to and correlation_id: a client that reconnected asks
        again from a new reply queue, and the old one is gone."""

        async def insert() -> bool:
            async with self._cursor() as cur:
                try:
                    await cur.execute(
                        "INSERT INTO export_checksums (node_id, job_id, vm_id, "
                        "disk_unit_number, device_path, device_id, algorithm, block_size, "
                        "reply_to, correlation_id) "
                        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                        (
                            *(self._node, job.job_id, job.vm_id, job.disk_unit_number),
                            *(job.device_path, job.device_id, job.algorithm, job.block_size),
                            *(job.reply_to, job.correlation_id),
                        ),
                    )
                except pymysql.err.IntegrityError as exc:
                    if not _is_duplicate(exc, "PRIMARY"):
                        raise translate_error(exc) from exc
                else:
                    return True
                await cur.execute(
                    "UPDATE export_checksums SET reply_to = %s, correlation_id = %s "
                    "WHERE node_id = %s AND job_id = %s AND reply IS NULL",
                    (job.reply_to, job.correlation_id, self._node, job.job_id),
                )
                return False

        return await self._retrying(insert)

    async def checksum_jobs(self, job_id: str | None = None) -> list[ChecksumJob]:
        """This node's checksum-exports not yet answered (or only `job_id`'s), oldest
        first."""

        async def query() -> list[ChecksumJob]:
            async with self._cursor() as cur:
                await cur.execute(
                    "SELECT job_id, vm_id, disk_unit_number, device_path, device_id, algorithm, "
                    "block_size, reply_to, correlation_id, reply FROM export_checksums "
                    "WHERE node_id = %s AND (%s IS NULL OR job_id = %s) ORDER BY created_at",
                    (self._node, job_id, job_id),
                )
                rows = await cur.fetchall()
            return [
                ChecksumJob(str(j), str(v), int(d), str(p), str(i), str(a), int(b), t, c, r)
                for j, v, d, p, i, a, b, t, c, r in rows
            ]

        return await self._retrying(query)

    async def finish_checksum(self, job: ChecksumJob, record: JobRecord) -> bool:
        """Keeps a checksum's reply (on its row, and as its job's record), in one
        transaction; False when the row has a reply already (another run finished first,
        and its reply is the one published)."""
        reply = json.dumps(record.reply, separators=(",", ":"))

        async def transaction() -> bool:
            async with self._cursor(transaction=True) as cur:
                await cur.execute(
                    "UPDATE export_checksums SET reply = %s "
                    "WHERE node_id = %s AND job_id = %s AND reply IS NULL",
                    (reply, self._node, job.job_id),
                )
                if int(cur.rowcount) != 1:
                    return False
                await cur.execute(
                    "INSERT INTO export_jobs (node_id, job_id, vm_id, disk_unit_number, reply) "
                    "VALUES (%s, %s, %s, %s, %s) ON DUPLICATE KEY UPDATE job_id = job_id",
                    (self._node, job.job_id, job.vm_id, job.disk_unit_number, reply),
                )
                return True

        return await self._retrying(transaction)

    async def drop_checksum(self, job_id: str) -> None:
        """A checksum whose reply the broker confirmed: its record answers from now on."""

        async def delete() -> None:
            async with self._cursor() as cur:
                await cur.execute(
                    "DELETE FROM export_checksums WHERE node_id = %s AND job_id = %s",
                    (self._node, job_id),
                )

        await self._retrying(delete)

    async def ping(self) -> None:
        """Raises TransientDatabaseError/DatabaseError unless a trivial query answers."""
        async with self._cursor() as cur:
            await cur.execute("SELECT 1")
            await cur.fetchone()

    async def schema_version(self) -> int:
        async with self._cursor() as cur:
            await cur.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
            row = await cur.fetchone()
        return int(row[0])


# --- schema migrations -------------------------------------------------------------------

_MIGRATION_RE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


def migrations_dir() -> Path:
    """The SQL migrations: inside the installed package, or schema/ in a source checkout."""
    packaged = Path(str(importlib.resources.files("worker"))) / "_schema" / "migrations"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "schema" / "migrations"


def split_statements(sql: str) -> list[str]:
    """Splits a migration on `;` at line ends; migrations keep one statement per `;`."""
    body = "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))
    return [stmt.strip() for stmt in re.split(r";\s*$", body, flags=re.M) if stmt.strip()]


async def _apply_migrations(
    cur: Any, name: str, files: list[Path], node_id: str, applied: list[str]
) -> None:
    """Applies what `schema_migrations` lacks, adding each name to `applied` (kept across
    tries: a try cut short after recording one must still report it)."""
    # Migrations may use @node_id: the node running them owns rows that predate nodes.
    await cur.execute("SET @node_id = %s", (node_id,))
    await cur.execute(f"CREATE DATABASE IF NOT EXISTS `{name}` CHARACTER SET utf8mb4")
    await cur.execute(f"USE `{name}`")
    await cur.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INT UNSIGNED NOT NULL PRIMARY KEY,"
        " name VARCHAR(255) NOT NULL,"
        " applied_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6))"
    )
    await cur.execute("SELECT version FROM schema_migrations")
    done = {row[0] for row in await cur.fetchall()}
    for path in files:
        version = int(path.name[:4])
        if version in done:
            continue
        for statement in split_statements(path.read_text()):
            await cur.execute(statement)
        await cur.execute(
            "INSERT IGNORE INTO schema_migrations (version, name) VALUES (%s, %s)",
            (version, path.name),
        )
        if path.name not in applied:
            applied.append(path.name)
        log.info("Applied migration %s to database %s", path.name, name)


def migrate_attempts(migrations: int) -> int:
    """`migrate`'s tries on conflicts. Each of many concurrent migrators can lose the race
    to record each migration, once or twice, so the tries grow with the migrations: 20
    migrators from three Galera nodes needed up to 7 tries for 5 migrations (2,000 runs);
    with 5 tries, some gave up in 5 of 6 runs of 30 to 40 rounds
    (tests/integration/test_galera_conflicts.py)."""
    return 5 + 2 * migrations


async def migrate(
    url: AnyUrl,
    *,
    node_id: str,
    timeout_s: float,
    directory: Path | None = None,
    tls: ssl.SSLContext | None = None,
) -> list[str]:
    """Creates the database if missing and applies new migrations in order; returns their
    names. Safe to run again and from two hosts at once: every statement is idempotent."""
    name = database_name(url)
    directory = directory or migrations_dir()
    files = sorted(p for p in directory.iterdir() if _MIGRATION_RE.match(p.name))
    try:
        conn = await aiomysql.connect(autocommit=True, **_connect_args(url, timeout_s, tls))
    except pymysql.MySQLError as exc:
        raise translate_error(exc) from exc
    try:
        if tls is not None:
            await _check_encrypted(conn, url)
        with warnings.catch_warnings():
            # "database exists" / "table exists" notes are the point of IF NOT EXISTS.
            warnings.simplefilter("ignore", pymysql.Warning)
            # On Galera, migrators on several nodes fail each other's statements: the
            # schema_migrations rows at certification (1213), a DDL BF-aborted by another
            # node's DDL (1317; worker/db_errors.py). Every statement is idempotent, so the
            # whole run is tried again.
            applied: list[str] = []
            async for attempt in retry_policy(attempts=migrate_attempts(len(files))):
                with attempt:
                    try:
                        async with conn.cursor() as cur:
                            await _apply_migrations(cur, name, files, node_id, applied)
                            return applied
                    except pymysql.MySQLError as exc:
                        raise translate_error(exc) from exc
    except pymysql.MySQLError as exc:
        raise translate_error(exc) from exc
    finally:
        conn.close()
    raise AssertionError("unreachable: retry_policy reraises")


def latest_migration_version(directory: Path | None = None) -> int:
    directory = directory or migrations_dir()
    versions = [int(p.name[:4]) for p in directory.iterdir() if _MIGRATION_RE.match(p.name)]
    return max(versions, default=0)
