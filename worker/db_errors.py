"""Which MySQL/MariaDB error numbers the worker retries, and how: one table, each row with
where the error comes from, so that a new Galera failure mode is a reviewed one-line change.

Three kinds:

- CONFLICT: the server rolled the statement (or the transaction) back because it lost a
  race that clears in milliseconds. The statement or transaction is tried again at once
  (repository.retry_policy), and so is `migrate`'s whole run. Only for idempotent
  statements: every statement of repository.py and every migration is.
- TRANSIENT: the server or the connection is unavailable for a while. Left to the job's
  retries, which wait longer; `migrate`, an operator's command, fails and is run again.
- PERMANENT: anything else. Retrying would give the same answer.

Galera (MariaDB 10.11, sources in MariaDB/server unless said otherwise):

- 1213 ER_LOCK_DEADLOCK. A certification failure at COMMIT (sql/wsrep_thd.h,
  wsrep_override_error: wsrep::e_deadlock_error); a local transaction brute-force (BF)
  aborted by a replicated one; a DDL that could not enter total order isolation
  (sql/wsrep_mysqld.cc, wsrep_TOI_begin: "WSREP replication failed"). Galera's documentation
  says the client should retry it (codership/documentation,
  galeracluster/source/dealingwithmultimasterconflicts.rst). The server itself retries an
  autocommit statement that failed certification wsrep_retry_autocommit times (default 1),
  never a multi-statement transaction (same document); what is left reaches us.
- 1317 ER_QUERY_INTERRUPTED. A statement BF-aborted while it holds or waits for a metadata
  lock that a replicated DDL needs (sql/wsrep_mysqld.cc, wsrep_handle_mdl_conflict ->
  wsrep_abort_thd; the MDL wait ends KILLED), e.g. a local ALTER TABLE that had not yet
  entered total order isolation when another node's ALTER of the same table arrived
  (mysql-test/suite/galera/t/MDEV-32938.test expects exactly this error), or a SELECT during
  a concurrent CREATE TABLE (MariaDB/server pull request 699); also wsrep::e_interrupted_error
  (sql/wsrep_thd.h). Seen here: concurrent `migrate`s from three nodes get it on
  `ALTER TABLE ... ADD COLUMN IF NOT EXISTS` (tests/integration/test_galera_conflicts.py).
  An operator's KILL QUERY gives the same number; the retry is bounded (repository.
  retry_policy), so a killed statement is tried at most a few more times.
- 1146 ER_NO_SUCH_TABLE. Seen here only while another node applied an ALTER TABLE of that
  table in total order isolation: once in about eight full runs of
  tests/integration/test_galera_conflicts.py (node 1 altering export_jobs every 50 ms; a
  repository on node 2 got "Table ... 'export_jobs' doesn't exist" 11 times in 8 s, beside
  1213s), never in nine runs of it alone, with the machine loaded or not. Which server path
  gives it (the replicated DDL swapping the table's definition under a statement it
  aborted) is not pinned down. Retried as a conflict because the worker's tables never
  disappear otherwise (migrations only add); a table that is truly missing, a database not
  migrated, costs only the bounded retries before the same error.
- 1205 ER_LOCK_WAIT_TIMEOUT (TRANSIENT): also wsrep::e_timeout_error (sql/wsrep_thd.h). It
  has already waited innodb_lock_wait_timeout, so it is not retried at once.
- 1047 ER_UNKNOWN_COM_ERROR (TRANSIENT): "WSREP has not yet prepared node for application
  use": a node that is not Synced or not in the primary component (the fault suite sees it
  from a rejoining node). It lasts seconds to minutes; MaxScale's readwritesplit retries it
  too (RWBackend::Error::is_wsrep_error: 1047 with SQLSTATE 08S01).

Considered and not retried (PERMANENT):

- 1180 ER_ERROR_DURING_COMMIT: write set too large, a provider failure or a storage I/O
  error at commit (sql/wsrep_thd.h, e_error_during_commit and e_size_exceeded_error;
  sql/wsrep_mysqld.cc); none of these clears by trying again. 1181
  ER_ERROR_DURING_ROLLBACK: the same, at rollback.
- 1105 ER_UNKNOWN_ERROR ("Maximum writeset size exceeded" in older servers, else unknown),
  1235 ER_NOT_SUPPORTED_YET (wsrep::e_not_supported_error), 4165
  ER_GALERA_REPLICATION_NOT_SUPPORTED (a storage engine Galera cannot replicate, or
  wsrep_mode forbids the statement): configuration, not races.
- 1614 ER_XA_RBDEADLOCK: what a certification failure is called in an XA transaction; the
  worker uses no XA.
"""

from __future__ import annotations

import enum


class ErrnoKind(enum.Enum):
    CONFLICT = "conflict"
    TRANSIENT = "transient"
    PERMANENT = "permanent"


#: The error numbers the worker retries; every other number is PERMANENT.
RETRIED_ERRNOS: dict[int, ErrnoKind] = {
    1213: ErrnoKind.CONFLICT,  # ER_LOCK_DEADLOCK: deadlock, certification failure, BF abort
    1317: ErrnoKind.CONFLICT,  # ER_QUERY_INTERRUPTED: BF abort over a metadata lock (TOI)
    1146: ErrnoKind.CONFLICT,  # ER_NO_SUCH_TABLE: seen beside another node's ALTER (TOI)
    1205: ErrnoKind.TRANSIENT,  # ER_LOCK_WAIT_TIMEOUT
    1047: ErrnoKind.TRANSIENT,  # ER_UNKNOWN_COM_ERROR: Galera node not ready
    2003: ErrnoKind.TRANSIENT,  # CR_CONN_HOST_ERROR: cannot connect
    2006: ErrnoKind.TRANSIENT,  # CR_SERVER_GONE_ERROR
    2013: ErrnoKind.TRANSIENT,  # CR_SERVER_LOST: lost connection during a query
}


def classify_errno(errno: int) -> ErrnoKind:
    """How an error with this number is retried."""
    return RETRIED_ERRNOS.get(errno, ErrnoKind.PERMANENT)
