"""`nbd-export-worker`: the command line, and the only place that wires objects together.

Exit codes: 0 success; 1 a runtime failure (a service unreachable, an error reply, a failed
check or self-test, a failed flush); 2 bad usage or settings; 3 the nbd-server must not be
used (too old, or it failed the data-path self-test); 4 `request` got no reply in time.
"""

from __future__ import annotations

import argparse
import asyncio
import configparser
import contextlib
import http.client
import ipaddress
import json
import logging
import os
import re
import resource
import signal
import ssl
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aio_pika
from pydantic import ValidationError

from worker import faults
from worker.access import all_loopback
from worker.broker import BrokerSession
from worker.consumer import JobConsumer, QueueConfig
from worker.dead_letters import list_dead_letters, replay_dead_letters
from worker.devices import DevicePolicy, device_present
from worker.errors import (
    ConfigWriteError,
    ServerUnavailable,
    UnsafeServer,
    UnsupportedServer,
    WorkerError,
)
from worker.flow import ExportFlow
from worker.jobs import JobLedger
from worker.logs import setup_logging
from worker.messages import VM_ID_PATTERN, FlushExport, ReleaseExport, write_schemas
from worker.metrics import Metrics, build_metrics
from worker.nbd.files import link_target
from worker.nbd.process import format_version
from worker.nbd.selftest import HOW_TO_FIX, run_self_test
from worker.nbd.server import HEALTH_PROBE_NAME, NbdServer, nbd_tls_session
from worker.nbd.tls_selftest import TLS_FILE_KEYS, TLS_PRIORITY, ServerTlsFiles, run_tls_close_test
from worker.nbd.wire import export_state
from worker.node_identity import (
    NODE_ID_FILE,
    NodeIdentity,
    NodeIdError,
    NodeIdSource,
    settle_node_id,
)
from worker.ops_http import OpsServer
from worker.reconcile import reconcile
from worker.repository import Repository, latest_migration_version, migrate
from worker.requester import connect_first, request_export
from worker.settings import Settings, mask_url
from worker.tls import TlsConfigError

log = logging.getLogger("worker")
T = TypeVar("T")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_UNSUPPORTED_SERVER = 3
EXIT_TIMEOUT = 4


# --- run --------------------------------------------------------------------------------


async def _record_server(server: NbdServer, metrics: Metrics, last_pid: int | None) -> int:
    """Refreshes the server's pid and version gauges; logs a restart. Returns the pid."""
    pid = server.process.verified_pid()
    if pid != last_pid:
        metrics.data_path_ok.set(float("nan"))  # this pid is not tested yet
        version = await server.process.check_version()
        metrics.server_pid.set(pid)
        metrics.server_info.info({"version": format_version(version), "pid": str(pid)})
        if last_pid is not None:
            log.warning("nbd-server restarted old_pid=%d pid=%d", last_pid, pid)
    return pid


async def _housekeeping(
    settings: Settings,
    repository: Repository,
    server: NbdServer,
    metrics: Metrics,
    pid: int | None,
) -> None:
    """Refreshes gauges and reconciles periodically, until cancelled; never raises."""
    loop = asyncio.get_running_loop()
    next_reconcile = loop.time() + settings.reconcile_interval_s
    while True:
        await asyncio.sleep(settings.housekeeping_interval_s)
        try:
            pid = await _record_server(server, metrics, pid)
            # A new main pid is vetted here (version, data-path self-test), before the
            # next job needs it; a dict lookup after that.
            await server.process.vet(pid)
        except WorkerError as exc:
            log.warning("Housekeeping failed: %s", exc)
        try:
            # Names the server knows are remembered per pid: only new ones are asked.
            await _learn_known_exports(repository, server, metrics)
        except WorkerError as exc:
            log.warning("Housekeeping failed: %s", exc)
        try:
            # Apart from the above: records are pruned while nbd-server is down too.
            pruned = await repository.prune_jobs(settings.job_record_retention_s)
            if pruned:
                log.info("Pruned job records count=%d", pruned)
            if settings.reconcile_interval_s and loop.time() >= next_reconcile:
                next_reconcile = loop.time() + settings.reconcile_interval_s
                await _reconcile_and_record(repository, server, metrics)
        except WorkerError as exc:
            log.warning("Housekeeping failed: %s", exc)


async def _learn_known_exports(repository: Repository, server: NbdServer, metrics: Metrics) -> None:
    """Asks the server which active exports it knows (those not remembered yet, a few GOs
    at a time), so that the first reuse of each after a start needs no probe of its own."""
    active = await repository.active_export_names()
    metrics.active_mappings.set(len(active))
    known = await server.known_names(active)
    metrics.exports_live.set(len(known))


async def _reconcile_and_record(
    repository: Repository, server: NbdServer, metrics: Metrics
) -> None:
    report = await reconcile(repository, server, dry_run=False)
    for kind, count in report.drift().items():
        metrics.drift.labels(kind=kind).set(count)


class Readiness:
    """/readyz: broker consuming, database answering, nbd-server verified and answering
    NBD_OPT_GO, and its binary passed the data-path self-test.

    Results are kept for a couple of seconds: the endpoint is unauthenticated, and each
    fresh check costs the server a connection (and a forked child).
    """

    CACHE_S = 2.0

    def __init__(
        self,
        settings: Settings,
        broker: BrokerSession,
        repository: Repository,
        server: NbdServer,
    ) -> None:
        self._settings = settings
        self._broker = broker
        self._repository = repository
        self._server = server
        self._last: tuple[float, dict[str, str | None]] | None = None
        self._lock = asyncio.Lock()

    async def check(self) -> dict[str, str | None]:
        async with self._lock:
            now = asyncio.get_running_loop().time()
            if self._last is not None and now - self._last[0] < self.CACHE_S:
                return self._last[1]
            result = await self._check_now()
            self._last = (now, result)
            return result

    async def _check_now(self) -> dict[str, str | None]:
        checks: dict[str, str | None] = {
            "broker": None if self._broker.is_consuming else "not connected or not consuming"
        }
        try:
            await asyncio.wait_for(self._repository.ping(), self._settings.probe_timeout_s)
            checks["database"] = None
        except (WorkerError, TimeoutError) as exc:
            checks["database"] = str(exc) or "timed out"
        checks["nbd_data_path"] = None
        try:
            try:
                await self._server.process.vet_running()
            except UnsafeServer as exc:
                checks["nbd_data_path"] = str(exc)
            await self._server.ping()
            checks["nbd_server"] = None
        except WorkerError as exc:
            checks["nbd_server"] = str(exc)
            checks["nbd_data_path"] = checks["nbd_data_path"] or f"not checked: {exc}"
        return checks


def _raise_open_files_limit() -> None:
    """The worker holds one descriptor per active export's device (so that a flush sees
    every writeback error): lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def serve(
    settings: Settings,
    stop: asyncio.Event,
    *,
    metrics: Metrics | None = None,
    started: asyncio.Event | None = None,
) -> None:
    """Runs the worker until `stop` is set, then drains in-flight jobs and closes.

    Raises UnsupportedServer before touching anything when nbd-server is older than 3.25,
    UnsafeServer when its binary fails the data-path self-test.
    """
    metrics = metrics or build_metrics(settings.node_id)
    faults.arm(settings.crash_at)
    _raise_open_files_limit()
    server = NbdServer(settings, metrics)
    pid: int | None = None
    try:
        pid = await _record_server(server, metrics, None)
        log.info("nbd-server main pid=%d config=%s", pid, settings.nbd_config_file)
        await server.process.vet(pid)  # the data-path self-test: UnsafeServer when it fails
    except UnsupportedServer:
        raise
    except ServerUnavailable as exc:
        # Not fatal: jobs get nbd_server_unavailable and /readyz says why until the server
        # is back. A too-old server is fatal, and is checked again before every SIGHUP.
        log.warning("nbd-server is not available at start-up: %s", exc)
    # Created traversable by nbd-server and writable by the worker only (the links choose
    # devices); an existing directory keeps the mode its installer gave it.
    try:
        settings.link_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        if not settings.auth_dir.is_dir():
            settings.auth_dir.mkdir(parents=True, exist_ok=True)
            # Whatever the umask: nbd-server (often another user) must enter it.
            settings.auth_dir.chmod(0o755)
    except OSError as exc:
        raise ConfigWriteError(f"cannot create {exc.filename}: {exc.strerror}") from exc
    repository = await Repository.connect(
        settings.database_url,
        node_id=settings.node_id,
        pool_size=settings.db_pool_size,
        timeout_s=settings.db_connect_timeout_s,
        on_retry=metrics.retries.labels(operation="database").inc,
        tls=_database_tls(settings),
    )
    ops: OpsServer | None = None
    housekeeping: asyncio.Task[None] | None = None
    ledger: JobLedger | None = None
    try:
        if settings.reconcile_on_start:
            try:
                await _reconcile_and_record(repository, server, metrics)
            except WorkerError as exc:
                log.warning("Start-up reconciliation failed: %s", exc)
        try:
            await _learn_known_exports(repository, server, metrics)
        except WorkerError as exc:
            log.warning("Could not ask nbd-server which exports it has: %s", exc)
        ledger = JobLedger(repository)
        flow = _flow(settings, repository, server, ledger)
        queues = QueueConfig(
            request_queue=settings.request_queue,
            reply_queue=settings.reply_queue,
            exchange=settings.exchange,
            routing_key=settings.routing_key,
            node_id=settings.node_id,
            prefetch=settings.prefetch,
            delivery_limit=settings.delivery_limit,
            publish_timeout_s=settings.publish_timeout_s,
            job_attempts=settings.job_attempts,
            retry_backoff_s=settings.retry_backoff_s,
            retry_backoff_max_s=settings.retry_backoff_max_s,
        )
        broker = BrokerSession(
            settings.amqp_urls,
            lambda channel: JobConsumer(channel, flow, metrics, queues),
            metrics,
            connect_timeout_s=settings.db_connect_timeout_s,
            shutdown_grace_s=settings.shutdown_grace_s,
        )
        readiness = Readiness(settings, broker, repository, server)
        if settings.metrics_port:
            ops = OpsServer(
                asyncio.get_running_loop(),
                metrics.registry,
                readiness.check,
                host=settings.metrics_host,
                port=settings.metrics_port,
            )
            ops.start()
        housekeeping = asyncio.create_task(
            _housekeeping(settings, repository, server, metrics, pid)
        )

        def on_ready() -> None:
            log.info(
                "Worker ready node=%s queue=%s routing_key=%s metrics_port=%d",
                settings.node_id,
                settings.request_queue,
                settings.routing_key,
                settings.metrics_port,
            )
            if started is not None:
                started.set()

        await broker.run(stop, on_ready)
    finally:
        if ledger is not None:
            await ledger.close()
        if housekeeping is not None:
            housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await housekeeping
        if ops is not None:
            ops.stop()
        server.close()
        await repository.close()


async def _run(settings: Settings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await serve(settings, stop)
    except UnsupportedServer as exc:
        log.critical("Refusing to start: %s", exc)
        return EXIT_UNSUPPORTED_SERVER
    except WorkerError as exc:
        log.critical("Cannot start: %s", exc)
        return EXIT_FAILURE
    return EXIT_OK


# --- operator commands ------------------------------------------------------------------


def _tls_error(exc: BaseException) -> ssl.SSLError | None:
    """The TLS failure behind `exc`, if any (aio-pika wraps it in its own error's args)."""
    seen: list[object] = [exc]
    while seen:
        found = seen.pop()
        if isinstance(found, ssl.SSLError):
            return found
        if isinstance(found, BaseException):
            seen += [*found.args, found.__cause__, found.__context__]
    return None


def _database_tls(settings: Settings) -> ssl.SSLContext | None:
    """Raises TlsConfigError when the configured files cannot be used."""
    files = settings.database_tls_files
    return None if files is None else files.client_context("database")


@contextlib.asynccontextmanager
async def _adapters(settings: Settings) -> AsyncIterator[tuple[Repository, NbdServer]]:
    repository = await Repository.connect(
        settings.database_url,
        node_id=settings.node_id,
        pool_size=2,
        timeout_s=settings.db_connect_timeout_s,
        tls=_database_tls(settings),
    )
    server = NbdServer(settings, build_metrics(settings.node_id))
    try:
        yield repository, server
    finally:
        server.close()
        await repository.close()


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    cells = [[str(row[c]) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def _offers(flags: dict[str, bool] | None) -> str:
    """The data-path flags an export advertises, for the status table: flush,fua,trim,..."""
    if flags is None:
        return "-"
    names = {"can_flush": "flush", "can_fua": "fua", "can_trim": "trim", "can_zero": "zero"}
    names["can_multi_conn"] = "multi-conn"
    offered = [label for key, label in names.items() if flags.get(key)]
    if flags.get("read_only"):
        offered.insert(0, "read-only")
    return ",".join(offered) or "none"


def _access(row: dict[str, Any]) -> str:
    """Who may connect, for the status table."""
    if row["protected"] is False:
        return "UNPROTECTED"
    if row["tls_only"] is False:
        return "PLAINTEXT"
    if row["authfile"] not in (None, "ok"):
        return f"authfile {row['authfile']}"
    if row["status"] != "active":
        return "nobody"
    return ",".join(row["client_addresses"] or []) or "-"


async def _status(settings: Settings, args: argparse.Namespace) -> int:
    """Mappings with their live state; exit 1 when this node's nbd-server does not answer
    (the health check `nbd-client -l` was, without listing anything to anyone). Only this
    node's server can be probed: rows of other nodes (--node, --all-nodes) show the
    database's view, with known/servable unknown."""
    async with _adapters(settings) as (repository, server):
        mappings = await repository.list_mappings(
            active_only=not args.all, node_id=args.node, all_nodes=args.all_nodes
        )
        answering = True
        try:
            await server.ping()
        except ServerUnavailable as exc:
            print(f"warning: nbd-server does not answer: {exc}", file=sys.stderr)
            answering = False
        local = [m for m in mappings if m.node_id == settings.node_id]
        known = await server.known_names(m.export_name for m in local) if answering else set()
        doors: dict[str, tuple[str, ...] | None] = {}
        for m in local:
            try:
                doors[m.export_name] = (
                    m.admitted(settings.client_addresses) if m.is_active else None
                )
            except ValueError:
                doors[m.export_name] = ()  # a corrupt column: shown as a wrong authfile
        live = [m.export_name for m in local if m.is_active and m.export_name in known]
        infos = dict(
            zip(live, await asyncio.gather(*(server.servable(n) for n in live)), strict=True)
        )
        protected = await server.unprotected(
            {n: doors[n] or () for n, info in infos.items() if info is not None}
        )
        # With TLS on: exports loaded before it keep serving plain clients until a restart.
        plaintext = (
            await server.plaintext_open([n for n, info in infos.items() if info is not None])
            if server.tls
            else {}
        )
        rows: list[dict[str, Any]] = []
        for m in mappings:
            here = m.node_id == settings.node_id
            probed = here and answering
            name = m.export_name
            info = infos.get(name)
            verdict = protected.get(name)
            rows.append(
                {
                    "node_id": m.node_id,
                    "export_name": name,
                    "vm_id": m.vm_id,
                    "disk_unit_number": m.disk_unit_number,
                    "vm_name": m.vm_name,
                    "status": m.status,
                    "device_path": m.device_path,
                    "device_present": device_present(m.device_path) if here else None,
                    "link_target": link_target(server.spec(name).link_path) if here else None,
                    # Known: the server has the name (loaded; released ones until a restart).
                    "known": name in known if probed else None,
                    "servable": info is not None if probed and m.is_active else None,
                    "size_bytes": info.size if info else None,
                    # As the server advertises them (NBD_OPT_GO): an export loaded before
                    # its snippet had the data-path options keeps its old ones until a
                    # restart.
                    "data_path": info.flags.as_dict() if info else None,
                    "client_addresses": list(doors[name] or []) if name in doors else None,
                    "authfile": server.authfile_state(name, doors[name]).value
                    if name in doors
                    else None,
                    # False: it admits everyone (loaded before it had an authfile).
                    "protected": None if verdict is None else not verdict,
                    # With NBD TLS on: False when plain clients can still open it.
                    "tls_only": None if plaintext.get(name) is None else not plaintext[name],
                    "flush_error": m.flush_error,
                    "updated_at": m.updated_at.isoformat() if m.updated_at else None,
                }
            )
    if args.json:
        print(json.dumps(rows, indent=2))
    elif rows:
        for row in rows:
            row["offers"] = _offers(row["data_path"])
            row["access"] = _access(row)
        columns = ["export_name", "status", "device_path", "device_present", "link_target"]
        columns += ["known", "servable", "offers", "access"]
        if args.node or args.all_nodes:
            columns.insert(0, "node_id")
        print(_table(rows, columns))
    else:
        print("no mappings")
    return EXIT_OK if answering else EXIT_FAILURE


async def _reconcile(settings: Settings, args: argparse.Namespace) -> int:
    async with _adapters(settings) as (repository, server):
        report = await reconcile(repository, server, dry_run=args.dry_run, thorough=True)
    print("\n".join(report.lines()))
    return EXIT_OK


def _disk_job(args: argparse.Namespace) -> dict[str, Any]:
    """The fields of a release-export or flush-export job the command line runs itself."""
    return {
        "job_id": f"cli-{uuid.uuid4().hex[:12]}",
        "vm_id": args.vm_id,
        "disk_unit_number": args.disk,
    }


async def _in_flow(settings: Settings, job: Callable[[ExportFlow], Awaitable[T]]) -> T:
    """Runs one job through the flow, as a worker would, for when no worker runs."""
    async with _adapters(settings) as (repository, server):
        return await job(_flow(settings, repository, server, JobLedger(repository)))


async def _flush(settings: Settings, args: argparse.Namespace) -> int:
    """The same flush as a flush-export job."""
    request = FlushExport(type="flush-export", **_disk_job(args))
    flushed = await _in_flow(settings, lambda flow: flow.flush_export(request))
    print(flushed.model_dump_json(indent=2))
    return EXIT_OK


async def _self_test(settings: Settings, args: argparse.Namespace) -> int:
    """The data-path self-test of a binary, or of the running server's (/proc/PID/exe)."""
    binary = args.binary
    if binary is None:
        server = NbdServer(settings, build_metrics(settings.node_id))
        binary = f"/proc/{server.process.verified_pid()}/exe"
    result = await run_self_test(str(binary), timeout_s=settings.self_test_timeout_s)
    print(result.summary())
    return EXIT_OK if result.ok else EXIT_FAILURE


async def _release(settings: Settings, args: argparse.Namespace) -> int:
    """The same release as a release-export job."""
    request = ReleaseExport(type="release-export", **_disk_job(args))
    released = await _in_flow(settings, lambda flow: flow.release_export(request))
    print(released.model_dump_json(indent=2))
    if not released.was_active:
        print(f"no active mapping for vm {args.vm_id} disk {args.disk}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _flow(
    settings: Settings, repository: Repository, server: NbdServer, ledger: JobLedger
) -> ExportFlow:
    return ExportFlow(
        repository,
        server,
        DevicePolicy(
            settings.device_roots,
            settings.allow_regular_files,
            by_id_dir=settings.by_id_dir,
            udev_wait_s=settings.udev_wait_s,
        ),
        ledger,
        nbd_host=settings.advertised_host,
        nbd_port=settings.nbd_port,
        node_id=settings.node_id,
        client_addresses=settings.client_addresses,
    )


def _read_server_config(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.read_string(path.read_text())
    return parser


async def _check(settings: Settings, identity: NodeIdentity) -> int:
    """Pre-flight: every problem found, not just the first."""
    results: list[tuple[str, str | None]] = []
    warnings: list[tuple[str, str]] = []
    try:
        server = NbdServer(settings, build_metrics(settings.node_id))
    except TlsConfigError as exc:
        print(f"FAIL {exc}")
        return EXIT_FAILURE
    results.append((f"node id {settings.node_id} (from the {identity.source.value})", None))
    drift = identity.container_warning()
    if drift:
        warnings.append(("node id", drift))
    if identity.source is NodeIdSource.HOST_NAME:
        warnings.append(
            (
                "node id",
                f"not written down yet: the first run writes it to "
                f"{settings.state_dir / NODE_ID_FILE}",
            )
        )

    try:
        pid = server.process.verified_pid()
        version = await server.process.check_version()
        results.append((f"nbd-server main process {pid}, version {format_version(version)}", None))
        # The same self-test `run` gates on, run afresh on the very binary the server runs.
        verdict = await run_self_test(f"/proc/{pid}/exe", timeout_s=settings.self_test_timeout_s)
        problem = None if verdict.ok else verdict.summary()
        if problem and settings.accept_failed_self_test:
            problem += " (the worker uses it anyway: EXPORT_WORKER_ACCEPT_FAILED_SELF_TEST)"
        results.append(("nbd-server data path (self-test of its binary)", problem))
    except WorkerError as exc:
        results.append(("nbd-server main process, version and data path", str(exc)))
    generic: Mapping[str, str] = {}
    try:
        config = _read_server_config(settings.nbd_config_file)
        if config.has_section("generic"):
            generic = config["generic"]
        includedir = str(generic.get("includedir", "")).strip()
        results.append(
            (
                "config: includedir is EXPORT_WORKER_NBD_CONF_DIR",
                None
                if includedir == str(settings.nbd_conf_dir)
                else f"includedir is {includedir!r}, the worker writes to {settings.nbd_conf_dir}",
            )
        )
    except (OSError, configparser.Error) as exc:
        results.append((f"config {settings.nbd_config_file} readable", str(exc)))
    for label, directory in (
        ("includedir", settings.nbd_conf_dir),
        ("link directory", settings.link_dir),
        ("authfile directory", settings.auth_dir),
    ):
        ok = directory.is_dir() and os.access(directory, os.W_OK | os.X_OK)
        results.append((f"{label} {directory} writable", None if ok else "missing or not writable"))
    try:
        await server.ping()
        route = server.route()
        results.append(
            (
                f"nbd-server answers at {settings.nbd_host}:{settings.nbd_port} "
                f"(probes from {route.source})",
                None,
            )
        )
    except WorkerError as exc:
        results.append(("nbd-server answers NBD_OPT_GO", str(exc)))
    mapped: list[str] = []
    try:
        access, mapped = await _access_results(settings, server)
        results += access
    except WorkerError as exc:
        results.append(("every export's authfile in place, readable and right", str(exc)))
    warnings += _exposure_warnings(settings, generic, mapped)
    if settings.nbd_tls:
        results += await _nbd_tls_results(settings, server, generic)
        if not str(generic.get("tlsprio", "")).strip():
            warnings.append(
                (
                    "config: no tlsprio",
                    "nbd-server does not apply its documented default, so TLS 1.0 and 1.1 "
                    f"are accepted: set tlsprio = {TLS_PRIORITY} in [generic]",
                )
            )
    for url in settings.amqp_urls:  # each node of a cluster, named without its password
        try:
            connection = await aio_pika.connect(url, timeout=settings.db_connect_timeout_s)
            await connection.close()
            results.append((f"broker {mask_url(url)} reachable", None))
        except Exception as exc:
            tls_error = _tls_error(exc)  # its words name no credential; others may
            results.append(
                (
                    f"broker {mask_url(url)} reachable",
                    f"TLS failed: {tls_error}" if tls_error else type(exc).__name__,
                )
            )
    try:
        async with _adapters(settings) as (repository, _):
            version_db = await repository.schema_version()
        latest = latest_migration_version()
        results.append(
            (
                "database reachable and migrated",
                None
                if version_db >= latest
                else f"schema version {version_db}, latest {latest}: run migrate",
            )
        )
    except Exception as exc:
        results.append(("database reachable and migrated", str(exc) or type(exc).__name__))

    for label, problem in results:
        print(
            f"{'ok  ' if problem is None else 'FAIL'} {label}" + (f": {problem}" if problem else "")
        )
    for label, problem in warnings:
        print(f"warn {label}: {problem}")
    return EXIT_OK if all(problem is None for _, problem in results) else EXIT_FAILURE


def _exposure_warnings(
    settings: Settings, generic: Mapping[str, str], mapped: Sequence[str]
) -> list[tuple[str, str]]:
    """Settings that expose exports to more of the network than their clients need, or
    that leave remote clients unable to connect (warnings: either may be meant). `mapped`:
    the client addresses active exports admit."""
    found = []
    if str(generic.get("allowlist", "false")).strip().lower() in ("true", "1"):
        found.append(
            (
                "config: allowlist = true",
                "the server lists every export (so every VM disk it serves) to anyone who can "
                "connect; the worker does not need it",
            )
        )
    listenaddr = str(generic.get("listenaddr", "")).strip()
    if not listenaddr and all_loopback([*settings.client_addresses, *mapped]):
        found.append(
            (
                "config: no listenaddr",
                "nbd-server listens on every address, but every client address is loopback: "
                "set listenaddr = 127.0.0.1 in [generic]",
            )
        )
    advertised = settings.advertised_host
    remote = sorted({a for a in [*settings.client_addresses, *mapped] if not all_loopback([a])})
    with contextlib.suppress(ValueError):
        if remote and ipaddress.ip_address(advertised).is_loopback:
            found.append(
                (
                    "EXPORT_WORKER_NBD_ADVERTISE_HOST",
                    f"replies tell clients to connect to {advertised} (loopback), but client "
                    f"addresses {', '.join(remote)} are not on this machine",
                )
            )
    return found


async def _nbd_tls_results(
    settings: Settings, server: NbdServer, generic: Mapping[str, str]
) -> list[tuple[str, str | None]]:
    """With NBD TLS on: the server offers TLS, and its build lets go of clients that
    close their TLS session (that every export refuses plain clients: _access_results)."""
    results: list[tuple[str, str | None]] = []
    label = "nbd-server lets go of TLS clients that close cleanly (close_notify self-test)"
    files = {key: str(generic.get(key, "")).strip() for key in TLS_FILE_KEYS}
    missing = [key for key, value in files.items() if not value]
    client = server.tls_session
    if missing or client is None:
        results.append(("config: nbd-server offers TLS", f"[generic] lacks {', '.join(missing)}"))
    else:
        try:
            pid = server.process.verified_pid()
            verdict = await run_tls_close_test(
                f"/proc/{pid}/exe",
                ServerTlsFiles(*(Path(files[key]) for key in TLS_FILE_KEYS)),
                client,
                timeout_s=settings.self_test_timeout_s,
            )
            results.append(
                (label, None if verdict.ok else f"{'; '.join(verdict.failures)}. {HOW_TO_FIX}")
            )
        except WorkerError as exc:
            results.append((label, str(exc)))
    return results


async def _access_results(
    settings: Settings, server: NbdServer
) -> tuple[list[tuple[str, str | None]], list[str]]:
    """Every export's authfile in place and right, and no export that ignores its own; and
    the client addresses of active exports that are not loopback."""
    async with _adapters(settings) as (repository, _):
        report = await reconcile(repository, server, dry_run=True)
        remote: list[str] = []
        for m in await repository.list_mappings(active_only=True):
            with contextlib.suppress(ValueError):  # a corrupt row: reported above
                remote += [
                    a for a in m.admitted(settings.client_addresses) if not all_loopback([a])
                ]
    problems = [f"{n} ({state})" for n, state in report.authfiles_repaired.items()]
    results: list[tuple[str, str | None]] = [
        ("nbd-server's user can read the authfiles", report.auth_dir_problem),
        (
            "every export's authfile in place, readable and right",
            f"{', '.join(problems)}: run reconcile (a missing or unreadable authfile admits "
            "everyone)"
            if problems
            else None,
        ),
        (
            "no export admits everyone",
            f"{', '.join(report.unprotected_exports)} were loaded before they had an authfile: "
            "restart nbd-server"
            if report.unprotected_exports
            else None,
        ),
    ]
    if server.tls:
        results.append(
            (
                "every export refuses plain clients (force_tls)",
                f"{', '.join(report.plaintext_exports)} were loaded before TLS was turned on "
                "and still serve plain clients: restart nbd-server"
                if report.plaintext_exports
                else None,
            )
        )
    return results, remote


async def _request(settings: Settings, args: argparse.Namespace) -> int:
    job = {
        "job_id": args.job_id or f"cli-{uuid.uuid4().hex[:12]}",
        "vm_id": args.vm_id,
        "vm_name": args.vm_name,
        "disk_unit_number": args.disk,
    }
    if args.device:
        job["device_path"] = args.device
    else:
        job["volume_id"] = args.volume
    try:
        reply = await request_export(
            settings.amqp_urls, settings.request_queue, job, timeout_s=args.timeout
        )
    except TimeoutError:
        print(f"no reply within {args.timeout:g} s (is the worker running?)", file=sys.stderr)
        return EXIT_TIMEOUT
    print(json.dumps(reply, indent=2))
    return EXIT_OK if reply.get("status") == "ready" else EXIT_FAILURE


async def _dead_letters(settings: Settings, args: argparse.Namespace) -> int:
    dead_letter_queue = f"{settings.request_queue}.dead"
    connection = await connect_first(settings.amqp_urls, settings.db_connect_timeout_s)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        if args.replay:
            letters = await replay_dead_letters(
                channel, dead_letter_queue, settings.request_queue, args.limit
            )
        else:
            letters = await list_dead_letters(channel, dead_letter_queue, args.limit)
    if args.json:
        print(json.dumps([letter.as_dict() for letter in letters], indent=2))
    else:
        for letter in letters:
            print(f"{letter.reason:16} job_id={letter.job_id} body={letter.preview!r}")
        if args.replay:
            print(
                f"{len(letters)} dead letter(s) replayed from {dead_letter_queue} "
                f"to {settings.request_queue}"
            )
        else:
            print(f"{len(letters)} dead letter(s) in {dead_letter_queue} (left in place)")
    return EXIT_OK


async def _healthcheck(settings: Settings, args: argparse.Namespace) -> int:
    """A container's HEALTHCHECK: the worker's /healthz (or /readyz) on the host and port
    its own settings give, or, with --nbd-server, an NBD handshake with the server."""
    if args.nbd_server:
        try:
            await export_state(
                settings.nbd_host,
                settings.nbd_port,
                HEALTH_PROBE_NAME,
                settings.probe_timeout_s,
                source=settings.probe_source_address or None,
                # As the worker's probes do: a server whose TLS is broken is not healthy.
                tls=nbd_tls_session(settings),
            )
        except WorkerError as exc:
            print(f"unhealthy: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        print(f"nbd-server answers at {settings.nbd_host}:{settings.nbd_port}")
        return EXIT_OK
    if not settings.metrics_port:
        print("unhealthy: EXPORT_WORKER_METRICS_PORT is 0, so no health endpoint", file=sys.stderr)
        return EXIT_FAILURE
    # A wildcard listener is reached on loopback.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(  # noqa: S104
        settings.metrics_host, settings.metrics_host
    )
    url = f"http://{f'[{host}]' if ':' in host else host}:{settings.metrics_port}/"
    url += "readyz" if args.ready else "healthz"

    def get() -> str:
        with urllib.request.urlopen(url, timeout=settings.probe_timeout_s) as response:  # noqa: S310
            return f"{response.status} {response.reason}"

    try:
        status = await asyncio.to_thread(get)
    except urllib.error.HTTPError as exc:
        print(f"unhealthy: {url} answered {exc.code}: {exc.read()[:300]!r}", file=sys.stderr)
        return EXIT_FAILURE
    except (OSError, http.client.HTTPException) as exc:  # URLError; not HTTP at all
        print(f"unhealthy: {url}: {exc!r}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"{url}: {status}")
    return EXIT_OK


async def _migrate(settings: Settings) -> int:
    try:
        applied = await migrate(
            settings.database_url,
            node_id=settings.node_id,
            timeout_s=settings.db_connect_timeout_s,
            tls=_database_tls(settings),
        )
    except WorkerError as exc:
        log.critical("Migration failed: %s", exc)
        return EXIT_FAILURE
    print(f"applied {len(applied)} migration(s)" + (": " + ", ".join(applied) if applied else ""))
    return EXIT_OK


# --- parsing ----------------------------------------------------------------------------


def _vm_id(value: str) -> str:
    if not re.fullmatch(VM_ID_PATTERN, value):
        raise argparse.ArgumentTypeError("expected 8-4-4-4-12 hex digits")
    return value.lower()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nbd-export-worker",
        description="Prepares NBD exports of VM disks for migration jobs. Settings come from "
        "EXPORT_WORKER_* environment variables (see README). Exit codes: 0 ok, 1 failure, "
        "2 usage or settings, 3 nbd-server must not be used (too old, or failed the data-path "
        "self-test), 4 no reply in time.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("run", help="consume prepare-export jobs until SIGTERM/SIGINT")
    commands.add_parser("migrate", help="create the database if missing and apply migrations")
    status = commands.add_parser(
        "status", help="mappings with their live state (listed, servable, link, device)"
    )
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.add_argument("--all", action="store_true", help="include inactive mappings")
    status.add_argument("--node", help="another node's mappings (default: this node's)")
    status.add_argument("--all-nodes", action="store_true", help="every node's mappings")
    rec = commands.add_parser(
        "reconcile", help="make snippets, links and the server agree with the active mappings"
    )
    rec.add_argument("--dry-run", action="store_true", help="report only, change nothing")
    request = commands.add_parser(
        "request", help="publish one prepare-export job and print its reply (exit 1 on error)"
    )
    request.add_argument("--vm-id", required=True, type=_vm_id)
    request.add_argument("--vm-name", required=True)
    request.add_argument("--disk", type=int, default=0, help="disk_unit_number (default 0)")
    device = request.add_mutually_exclusive_group(required=True)
    device.add_argument("--device", help="device_path on the appliance")
    device.add_argument("--volume", help="volume_id (CloudStack volume UUID) instead")
    request.add_argument("--job-id", help="default: cli-<random>")
    request.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
    release = commands.add_parser(
        "release", help="mark a mapping inactive and remove its link and snippet"
    )
    release.add_argument("--vm-id", required=True, type=_vm_id)
    release.add_argument("--disk", type=int, required=True, help="disk_unit_number")
    flush = commands.add_parser(
        "flush", help="fsync an export's device, as a flush-export job does (exit 1 on failure)"
    )
    flush.add_argument("--vm-id", required=True, type=_vm_id)
    flush.add_argument("--disk", type=int, required=True, help="disk_unit_number")
    self_test = commands.add_parser(
        "self-test",
        help="the data-path self-test of the running nbd-server's binary, or of --binary",
    )
    self_test.add_argument("--binary", type=Path, help="an nbd-server binary to test instead")
    dead = commands.add_parser(
        "dead-letters", help="list the dead-letter queue (left in place), or replay it"
    )
    dead.add_argument("--replay", action="store_true", help="move them back to the request queue")
    dead.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    dead.add_argument("--json", action="store_true")
    commands.add_parser("check", help="pre-flight checks; exit 1 listing what is wrong")
    health = commands.add_parser(
        "healthcheck",
        help="for a container's HEALTHCHECK: exit 0 when the worker's /healthz answers 200",
    )
    health.add_argument("--ready", action="store_true", help="ask /readyz instead")
    health.add_argument(
        "--nbd-server", action="store_true", help="check instead that nbd-server answers NBD"
    )
    commands.add_parser("show-config", help="print the effective settings, secrets masked")
    schemas = commands.add_parser(
        "schemas", help="write the JSON Schemas of the messages (default: schema/messages)"
    )
    schemas.add_argument("--out", type=Path, default=Path("schema/messages"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    unknown = Settings.unknown_variables(os.environ)
    if unknown:
        print(f"unknown settings (misspelled?): {', '.join(unknown)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        settings = Settings()
    except ValidationError as exc:
        # Without the input values: they may hold a password (a URL's credentials).
        problems = [
            f"  {'.'.join(str(part) for part in error['loc']) or 'settings'}: {error['msg']}"
            for error in exc.errors(include_url=False, include_input=False)
        ]
        print("invalid settings:\n" + "\n".join(problems), file=sys.stderr)
        return EXIT_USAGE
    setup_logging(settings.log_format, settings.log_level)
    try:
        identity = settle_node_id(settings, persist=args.command == "run")
    except NodeIdError as exc:
        print(f"invalid settings: {exc}", file=sys.stderr)
        return EXIT_USAGE
    settings = identity.settings
    if args.command == "run":
        for problem in (identity.unsaved, identity.container_warning()):
            if problem:
                log.warning(
                    "Node id %s may change on the next start: %s", settings.node_id, problem
                )
    if args.command == "show-config":
        print(json.dumps(settings.masked(), indent=2, sort_keys=True))
        return EXIT_OK
    if args.command == "schemas":
        for path in write_schemas(args.out):
            print(path)
        return EXIT_OK
    commands = {
        "run": lambda: _run(settings),
        "migrate": lambda: _migrate(settings),
        "status": lambda: _status(settings, args),
        "reconcile": lambda: _reconcile(settings, args),
        "release": lambda: _release(settings, args),
        "flush": lambda: _flush(settings, args),
        "self-test": lambda: _self_test(settings, args),
        "check": lambda: _check(settings, identity),
        "healthcheck": lambda: _healthcheck(settings, args),
        "request": lambda: _request(settings, args),
        "dead-letters": lambda: _dead_letters(settings, args),
    }
    with contextlib.suppress(KeyboardInterrupt):
        try:
            return asyncio.run(commands[args.command]())
        except WorkerError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_FAILURE
    return EXIT_FAILURE
