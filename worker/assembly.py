"""Builds the worker's objects from Settings: the one place that knows which setting goes
where. The service (worker/service.py) and the operator commands (worker/commands/) both
assemble through here, so a command runs a job exactly as the service would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from worker.broker import BrokerSession
from worker.checksums import Checksums
from worker.consumer import JobConsumer, QueueConfig
from worker.devices import DevicePolicy
from worker.events import EventPublisher
from worker.flow import ExportFlow
from worker.jobs import JobLedger
from worker.live import LiveView
from worker.live_sampler import LiveSampler
from worker.messages import ChecksumProgress
from worker.metrics import Metrics, build_metrics
from worker.nbd.baseline import BaselineNbdServer
from worker.nbd.server import NbdServer
from worker.nbd.wire import own_probes
from worker.publisher import ConfirmedPublisher
from worker.repository import Repository
from worker.settings import Settings

T = TypeVar("T")


def database_tls(settings: Settings) -> ssl.SSLContext | None:
    """Raises TlsConfigError when the configured files cannot be used."""
    files = settings.database_tls_files
    return None if files is None else files.client_context("database")


async def connect_repository(
    settings: Settings, *, pool_size: int, on_retry: Callable[[], None] | None = None
) -> Repository:
    return await Repository.connect(
        settings.database_url,
        node_id=settings.node_id,
        pool_size=pool_size,
        timeout_s=settings.db_connect_timeout_s,
        on_retry=on_retry,
        tls=database_tls(settings),
        client_addresses=settings.client_addresses,
    )


def build_server(settings: Settings, metrics: Metrics) -> NbdServer:
    """The nbd-server adapter; with EXPORT_WORKER_BASELINE, the original system's algorithm
    (for the benchmark), so that the hot path has no branch for it. Raises TlsConfigError."""
    server = BaselineNbdServer if settings.baseline else NbdServer
    return server(settings, metrics)


def queue_config(settings: Settings) -> QueueConfig:
    """QueueConfig is a narrow view of Settings: each of its fields is the setting of that
    name (a field with no such setting fails here, at start-up)."""
    names = [field.name for field in dataclasses.fields(QueueConfig)]
    return QueueConfig(**{name: getattr(settings, name) for name in names})


def build_live(
    settings: Settings,
    repository: Repository,
    server: NbdServer,
    metrics: Metrics,
    *,
    events: EventPublisher | None = None,
    keep: bool = True,
) -> LiveSampler:
    """The live view of the exports. `keep=False` (an operator command): counts nothing
    into export_usage, which only the running worker writes."""
    return LiveSampler(
        LiveView(server.main_pid, own_probes=own_probes),
        repository,
        link_for=lambda name: settings.link_dir / name,
        tls=server.tls,
        node_id=settings.node_id,
        metrics=metrics,
        events=events,
        keep=keep,
    )


def build_flow(
    settings: Settings,
    repository: Repository,
    server: NbdServer,
    ledger: JobLedger,
    live: LiveSampler | None = None,
    checksums: Callable[[str], ChecksumProgress | None] | None = None,
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
        live=live,
        lease_s=settings.lease_s,
        checksums=checksums,
    )


def build_checksums(
    settings: Settings, repository: Repository, flow: ExportFlow, metrics: Metrics
) -> Checksums:
    return Checksums(
        repository,
        flow,
        link_for=lambda name: settings.link_dir / name,
        node_id=settings.node_id,
        reply_queue=settings.reply_queue,
        metrics=metrics,
        concurrency=settings.checksum_concurrency,
    )


def build_broker(
    settings: Settings,
    flow: ExportFlow,
    metrics: Metrics,
    events: EventPublisher | None = None,
    checksums: Checksums | None = None,
) -> BrokerSession:
    """The broker session, with a JobConsumer on every channel it opens."""
    queues = queue_config(settings)

    def on_publisher(publisher: ConfirmedPublisher | None) -> None:
        if events is not None:
            events.attach(publisher)
        if checksums is not None:
            checksums.attach(publisher)

    return BrokerSession(
        settings.amqp_urls,
        lambda channel, publisher: JobConsumer(
            channel, publisher, flow, metrics, queues, checksums
        ),
        metrics,
        connect_timeout_s=settings.amqp_connect_timeout_s,
        publish_timeout_s=settings.publish_timeout_s,
        publish_retry_s=settings.publish_retry_s,
        shutdown_grace_s=settings.shutdown_grace_s,
        on_publisher=on_publisher,
    )


@contextlib.asynccontextmanager
async def adapters(settings: Settings) -> AsyncIterator[tuple[Repository, NbdServer]]:
    """The database and nbd-server adapters for one operator command: a small pool, and
    metrics nobody scrapes."""
    repository = await connect_repository(settings, pool_size=2)
    server = build_server(settings, build_metrics(settings.node_id))
    try:
        yield repository, server
    finally:
        server.close()
        await repository.close()


async def run_in_flow(settings: Settings, job: Callable[[ExportFlow], Awaitable[T]]) -> T:
    """Runs one job through the flow, as a worker would, for when no worker runs."""
    async with adapters(settings) as (repository, server):
        live = build_live(settings, repository, server, build_metrics(settings.node_id), keep=False)
        return await job(build_flow(settings, repository, server, JobLedger(repository), live))
