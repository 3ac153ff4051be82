"""The running service: its assembly, start-up, housekeeping, readiness and shutdown.

`serve` is what `nbd-export-worker run` runs (worker/commands/run.py adds the signals and
exit codes). It builds its objects through worker/assembly.py, like every command.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource

from worker import faults
from worker.assembly import (
    build_broker,
    build_checksums,
    build_flow,
    build_live,
    build_server,
    connect_repository,
)
from worker.broker import BrokerSession
from worker.checksums import Checksums
from worker.errors import (
    ServerMisconfigured,
    ServerUnavailable,
    UnsafeServer,
    UnsupportedServer,
    WorkerError,
)
from worker.events import EventPublisher
from worker.expiry import Expiry
from worker.jobs import JobLedger
from worker.live_sampler import LiveSampler
from worker.metrics import Metrics, build_metrics
from worker.nbd.files import make_worker_dir
from worker.nbd.process import format_version
from worker.nbd.server import NbdServer
from worker.ops_http import OpsServer
from worker.reconcile import reconcile
from worker.repository import Repository
from worker.settings import Settings

log = logging.getLogger("worker")


async def _record_server(server: NbdServer, metrics: Metrics, last_pid: int | None) -> int:
    """Refreshes the server's pid and version gauges; logs a restart. Returns the pid."""
    pid = server.main_pid()
    if pid != last_pid:
        metrics.data_path_ok.set(float("nan"))  # this pid is not tested yet
        version = await server.check_version()
        metrics.server_pid.set(pid)
        metrics.server_info.info({"version": format_version(version), "pid": str(pid)})
        if last_pid is not None:
            log.warning("nbd-server restarted old_pid=%d pid=%d", last_pid, pid)
    return pid


class _Problems:
    """Housekeeping's failures, logged when they first appear and when they clear: a
    server that stays misconfigured or down is said once, not every few seconds."""

    def __init__(self) -> None:
        self._current: dict[str, str] = {}

    def ok(self, step: str) -> None:
        if self._current.pop(step, None) is not None:
            log.info("Housekeeping recovered step=%s", step)

    def failed(self, step: str, exc: WorkerError) -> None:
        if self._current.get(step) != str(exc):
            self._current[step] = str(exc)
            log.warning("Housekeeping failed step=%s: %s", step, exc)


async def _housekeeping(
    settings: Settings,
    repository: Repository,
    server: NbdServer,
    metrics: Metrics,
    readiness: Readiness,
    pid: int | None,
) -> None:
    """Refreshes gauges (readiness among them, so that an alert sees a worker that is not
    ready even when nobody polls /readyz) and reconciles periodically, until cancelled;
    never raises."""
    loop = asyncio.get_running_loop()
    next_reconcile = loop.time() + settings.reconcile_interval_s
    problems = _Problems()
    while True:
        await asyncio.sleep(settings.housekeeping_interval_s)
        try:
            pid = await _record_server(server, metrics, pid)
            # A new main pid passes its gates here (config, version, data-path self-test), before
            # the next job needs it; a dict lookup after that.
            await server.pass_gates(pid)
            problems.ok("server")
        except WorkerError as exc:
            problems.failed("server", exc)
        try:
            # Names the server knows are remembered per pid: only new ones are asked.
            await _learn_known_exports(repository, server, metrics)
            problems.ok("exports")
        except WorkerError as exc:
            problems.failed("exports", exc)
        try:
            # Apart from the above: records are pruned while nbd-server is down too.
            pruned = await repository.prune_jobs(settings.job_record_retention_s)
            if pruned:
                log.info("Pruned job records count=%d", pruned)
            if settings.reconcile_interval_s and loop.time() >= next_reconcile:
                next_reconcile = loop.time() + settings.reconcile_interval_s
                await reconcile_and_record(repository, server, metrics)
            problems.ok("database")
        except WorkerError as exc:
            problems.failed("database", exc)
        try:
            await readiness.check()  # its failures are its result, on the gauge
        except Exception:  # a bug: said, and housekeeping goes on
            log.exception("Readiness check failed")


async def _learn_known_exports(repository: Repository, server: NbdServer, metrics: Metrics) -> None:
    """Asks the server which active exports it knows (those not remembered yet, a few GOs
    at a time), so that the first reuse of each after a start needs no probe of its own."""
    active = await repository.active_export_names()
    metrics.active_mappings.set(len(active))
    known = await server.known_names(active)
    metrics.exports_live.set(len(known))


async def reconcile_and_record(repository: Repository, server: NbdServer, metrics: Metrics) -> None:
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
        metrics: Metrics,
    ) -> None:
        self._settings = settings
        self._broker = broker
        self._repository = repository
        self._server = server
        self._metrics = metrics
        self._last: tuple[float, dict[str, str | None]] | None = None
        self._lock = asyncio.Lock()

    async def check(self) -> dict[str, str | None]:
        async with self._lock:
            now = asyncio.get_running_loop().time()
            if self._last is not None and now - self._last[0] < self.CACHE_S:
                return self._last[1]
            result = await self._check_now()
            self._last = (now, result)
            for check, problem in result.items():
                self._metrics.ready.labels(check=check).set(0 if problem else 1)
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
                await self._server.gated_main_pid()
            except UnsafeServer as exc:
                checks["nbd_data_path"] = str(exc)
            await self._server.ping()
            checks["nbd_server"] = None
        except WorkerError as exc:
            checks["nbd_server"] = str(exc)
            # Said once, under nbd_server.
            checks["nbd_data_path"] = checks["nbd_data_path"] or "not checked: see nbd_server"
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
    server = build_server(settings, metrics)
    pid: int | None = None
    try:
        pid = await _record_server(server, metrics, None)
        log.info("nbd-server main pid=%d config=%s", *server.main_pid_and_config())
        await server.pass_gates(pid)  # the data-path self-test: UnsafeServer when it fails
    except UnsupportedServer:
        raise
    except ServerMisconfigured as exc:
        # Not fatal either (an operator may fix the config and restart the server), but
        # not transient: every job is answered nbd_server_misconfigured at once, and
        # /readyz and `check` say the same.
        log.error(  # noqa: TRY400 - the message says it all; a traceback would bury it
            "nbd-server is misconfigured: %s. Jobs get nbd_server_misconfigured until it is fixed",
            exc,
        )
    except ServerUnavailable as exc:
        # Not fatal: jobs get nbd_server_unavailable and /readyz says why until the server
        # is back. A too-old server is fatal, and is checked again before every SIGHUP.
        log.warning("nbd-server is not available at start-up: %s", exc)
    # Writable by the worker only (the links choose devices), entered by nbd-server.
    make_worker_dir(settings.link_dir)
    make_worker_dir(settings.auth_dir)
    repository = await connect_repository(
        settings,
        pool_size=settings.db_pool_size,
        on_retry=metrics.retries.labels(operation="database").inc,
    )
    ops: OpsServer | None = None
    housekeeping: asyncio.Task[None] | None = None
    ledger: JobLedger | None = None
    live: LiveSampler | None = None
    checksums: Checksums | None = None
    background: list[asyncio.Task[None]] = []
    try:
        if settings.reconcile_on_start:
            try:
                await reconcile_and_record(repository, server, metrics)
            except WorkerError as exc:
                log.warning("Start-up reconciliation failed: %s", exc)
        try:
            await _learn_known_exports(repository, server, metrics)
        except WorkerError as exc:
            log.warning("Could not ask nbd-server which exports it has: %s", exc)
        ledger = JobLedger(repository)
        events = EventPublisher(settings.exchange, settings.node_id, metrics)
        live = build_live(settings, repository, server, metrics, events=events)
        metrics.export_series.views = live.view.views
        # Late-bound: the checksums run through the flow, and inspect-export shows them.
        flow = build_flow(
            settings,
            repository,
            server,
            ledger,
            live,
            checksums=lambda name: checksums.progress(name) if checksums else None,
        )
        checksums = build_checksums(settings, repository, flow, metrics)
        # Checksums a stopped worker left: hashed again, or their answers published.
        checksums.start_resume()
        broker = build_broker(settings, flow, metrics, events, checksums)
        # Beside the jobs, never on their path: the live view's samples and its events.
        background.append(asyncio.create_task(events.run()))
        if settings.live_sample_s > 0:
            background.append(asyncio.create_task(live.run(settings.live_sample_s)))
        expiry = Expiry(
            repository,
            flow,
            live,
            events,
            node_id=settings.node_id,
            notice_s=settings.expiry_notice_s,
            grace_s=settings.expiry_grace_s,
            metrics=metrics,
        )
        background.append(asyncio.create_task(expiry.run(settings.expiry_check_s)))
        readiness = Readiness(settings, broker, repository, server, metrics)
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
            _housekeeping(settings, repository, server, metrics, readiness, pid)
        )

        def on_ready() -> None:
            log.info(
                "Worker ready node=%s queue=%s routing_key=%s metrics_port=%d loop=%s",
                settings.node_id,
                settings.request_queue,
                settings.routing_key,
                settings.metrics_port,
                type(asyncio.get_running_loop()).__module__.partition(".")[0],
            )
            if started is not None:
                started.set()

        await broker.run(stop, on_ready)
    finally:
        for task in background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if checksums is not None:
            await checksums.close()
        if live is not None:
            await live.close()
        metrics.export_series.views = dict
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
