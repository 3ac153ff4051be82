"""The database error table (worker/db_errors.py): what is retried at once, what is left to
the job's retries, and the Galera errors deliberately not retried; and that the repository's
error mapping and `migrate`'s retries follow it."""

from __future__ import annotations

import pymysql
import pytest

from worker.db_errors import RETRIED_ERRNOS, ErrnoKind, classify_errno
from worker.errors import DatabaseError, TransactionConflict, TransientDatabaseError
from worker.repository import migrate_attempts, translate_error

CONFLICT, TRANSIENT, PERMANENT = ErrnoKind.CONFLICT, ErrnoKind.TRANSIENT, ErrnoKind.PERMANENT

TABLE = [
    # Galera conflicts: certification failure or BF abort...
    (1213, CONFLICT),  # ER_LOCK_DEADLOCK
    # ...and a statement BF-aborted over a metadata lock by another node's DDL (TOI).
    (1317, CONFLICT),  # ER_QUERY_INTERRUPTED
    # ...and, beside another node's ALTER of the table, a table briefly not found.
    (1146, CONFLICT),  # ER_NO_SUCH_TABLE
    (1205, TRANSIENT),  # ER_LOCK_WAIT_TIMEOUT
    (1047, TRANSIENT),  # ER_UNKNOWN_COM_ERROR: WSREP has not yet prepared node
    (2003, TRANSIENT),  # cannot connect
    (2006, TRANSIENT),  # server gone away
    (2013, TRANSIENT),  # lost connection
    # Galera errors considered and not retried: they do not clear by trying again.
    (1180, PERMANENT),  # ER_ERROR_DURING_COMMIT: write set too large, provider failure
    (1181, PERMANENT),  # ER_ERROR_DURING_ROLLBACK
    (1105, PERMANENT),  # ER_UNKNOWN_ERROR
    (1235, PERMANENT),  # ER_NOT_SUPPORTED_YET
    (1614, PERMANENT),  # ER_XA_RBDEADLOCK: XA only, which the worker never uses
    (4165, PERMANENT),  # ER_GALERA_REPLICATION_NOT_SUPPORTED
    # Not Galera's: answered by the worker's own logic, or plain errors.
    (1062, PERMANENT),  # ER_DUP_ENTRY: the claim's arbiter
    (0, PERMANENT),  # a driver error without a number
]
KINDS = {
    CONFLICT: TransactionConflict,
    TRANSIENT: TransientDatabaseError,
    PERMANENT: DatabaseError,
}


@pytest.mark.parametrize(("errno", "kind"), TABLE)
def test_classify_errno(errno: int, kind: ErrnoKind) -> None:
    assert classify_errno(errno) is kind


def test_every_retried_number_is_in_the_table() -> None:
    # A number added to RETRIED_ERRNOS without a row here (and its source in the module's
    # docstring) fails: every retried error is a reviewed choice.
    assert {errno for errno, kind in TABLE if kind is not PERMANENT} == set(RETRIED_ERRNOS)


@pytest.mark.parametrize(("errno", "kind"), TABLE)
def test_translate_error_follows_the_table(errno: int, kind: ErrnoKind) -> None:
    error = translate_error(pymysql.err.OperationalError(errno, "x"))
    assert type(error) is KINDS[kind]
    assert error.retryable is (kind is not PERMANENT)


def test_migrate_tries_more_as_the_migrations_grow() -> None:
    # Each concurrent migrator may lose the race to record each migration once or twice.
    assert migrate_attempts(5) >= 2 * 5 + 1
    assert migrate_attempts(10) > migrate_attempts(5)
