"""Prometheus metrics: one registry per worker, built here.

Names follow Prometheus conventions (base units, `_total` counters, `_seconds` durations);
labels take bounded values only (actions, outcomes, codes, reasons), never job or VM ids;
the one exception is the per-export series of the live view (worker/live_sampler.py), which
are labelled with the export and exist only while the export is active.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from worker.live import ExportView

#: Jobs span ~1 ms (reuse) to seconds (a create on a busy server).
JOB_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ExportSeries(Collector):
    """The live view's per-export series, from its last sample, for the exports it follows
    now only: a released export's series are gone at the next scrape, so a long-lived
    appliance does not grow stale ones. `views` is set by the running service."""

    def __init__(self) -> None:
        self.views: Callable[[], Mapping[str, ExportView]] = dict

    def collect(self) -> Iterator[Metric]:
        connections = GaugeMetricFamily(
            "nbd_export_connections", "Open connections of an export.", labels=["export"]
        )
        written = CounterMetricFamily(
            "nbd_export_written_bytes",
            "Data written through an export since it was prepared.",
            labels=["export"],
        )
        read = CounterMetricFamily(
            "nbd_export_read_bytes",
            "Data read through an export since it was prepared.",
            labels=["export"],
        )
        idle = GaugeMetricFamily(
            "nbd_export_idle_seconds",
            "Seconds since an export's last I/O (or since it was prepared).",
            labels=["export"],
        )
        for name, view in sorted(self.views().items()):
            connections.add_metric([name], len(view.connections))
            written.add_metric([name], view.bytes_written)
            read.add_metric([name], view.bytes_read)
            idle.add_metric([name], view.idle_seconds)
        yield from (connections, written, read, idle)


@dataclass(frozen=True)
class Metrics:
    registry: CollectorRegistry
    jobs: Counter
    job_duration: Histogram
    in_flight: Gauge
    dead_lettered: Counter
    retries: Counter
    requeued: Counter
    settle_failures: Counter
    consumer_cancels: Counter
    broker_reconnects: Counter
    publish_retries: Counter
    sighups: Counter
    sighup_failures: Counter
    reload_visible: Histogram
    lock_wait: Histogram
    probe_duration: Histogram
    probe_failures: Counter
    active_mappings: Gauge
    exports_live: Gauge
    drift: Gauge
    server_pid: Gauge
    server_info: Info
    data_path_ok: Gauge
    self_tests: Counter
    flushes: Counter
    flush_duration: Histogram
    ready: Gauge
    events: Counter
    events_dropped: Counter
    live_samples: Counter
    live_sample_duration: Histogram
    export_series: ExportSeries
    expiries: Counter
    checksum_bytes: Counter
    checksums_running: Gauge
    checksums: Counter


class NodeRegistry(CollectorRegistry):
    """A registry that labels every sample with the node (appliance) it comes from, so
    dashboards of several appliances can be filtered by node whatever the scrape config."""

    def __init__(self, node_id: str) -> None:
        super().__init__()
        self._node_id = node_id

    def collect(self) -> Iterator[Metric]:
        for metric in super().collect():
            labelled = Metric(metric.name, metric.documentation, metric.type, metric.unit)
            labelled.samples = [
                sample._replace(labels={**sample.labels, "node": self._node_id})
                for sample in metric.samples
            ]
            yield labelled


def build_metrics(node_id: str) -> Metrics:
    metrics = _build(NodeRegistry(node_id))
    metrics.data_path_ok.set(float("nan"))  # not tested yet: neither passed nor failed
    return metrics


def _build(r: NodeRegistry) -> Metrics:
    export_series = ExportSeries()
    r.register(export_series)
    return Metrics(
        export_series=export_series,
        registry=r,
        jobs=Counter(
            "nbd_export_jobs",
            "Jobs handled, by outcome: the action taken, or failed.",
            ["outcome"],
            registry=r,
        ),
        job_duration=Histogram(
            "nbd_export_job_duration_seconds",
            "Time from receiving a job to its reply being confirmed.",
            buckets=JOB_BUCKETS,
            registry=r,
        ),
        in_flight=Gauge("nbd_export_jobs_in_flight", "Jobs being handled now.", registry=r),
        dead_lettered=Counter(
            "nbd_export_dead_lettered",
            "Requests rejected to the dead-letter queue, by error code.",
            ["code"],
            registry=r,
        ),
        retries=Counter(
            "nbd_export_retries",
            "Retries of a failed operation, by operation.",
            ["operation"],
            registry=r,
        ),
        requeued=Counter(
            "nbd_export_requeued",
            "Requests returned to the queue: a transient failure outlasted this delivery's "
            "retries, or the reply was not confirmed.",
            registry=r,
        ),
        settle_failures=Counter(
            "nbd_export_settle_failures",
            "Acks/rejects that failed because the channel had closed (the broker redelivers).",
            registry=r,
        ),
        consumer_cancels=Counter(
            "nbd_export_consumer_cancels",
            "Times the broker cancelled the worker's consumer (then it consumes again).",
            registry=r,
        ),
        broker_reconnects=Counter(
            "nbd_export_broker_reconnects", "Reconnections to RabbitMQ.", registry=r
        ),
        publish_retries=Counter(
            "nbd_export_publish_retries",
            "Publishes tried again on a fresh channel, by why the last try failed: nack "
            "(e.g. a channel first used during a quorum queue's leader election), timeout "
            "(no confirm in time) or closed (the channel closed under it).",
            ["reason"],
            registry=r,
        ),
        sighups=Counter(
            "nbd_server_sighups", "SIGHUPs sent to nbd-server's main process.", registry=r
        ),
        sighup_failures=Counter(
            "nbd_server_sighup_failures",
            "Reloads not sent: the main process was missing or failed verification.",
            registry=r,
        ),
        reload_visible=Histogram(
            "nbd_server_reload_visible_seconds",
            "Time from a SIGHUP until the server knows every new export.",
            buckets=JOB_BUCKETS,
            registry=r,
        ),
        lock_wait=Histogram(
            "nbd_export_config_lock_wait_seconds",
            "Time spent waiting for the config/reload lock.",
            buckets=JOB_BUCKETS,
            registry=r,
        ),
        probe_duration=Histogram(
            "nbd_server_probe_duration_seconds",
            "Duration of probes of nbd-server (NBD_OPT_GO, from the worker's address).",
            buckets=JOB_BUCKETS,
            registry=r,
        ),
        probe_failures=Counter(
            "nbd_server_probe_failures",
            "Probes that failed, by reason: timeout or unavailable.",
            ["reason"],
            registry=r,
        ),
        active_mappings=Gauge(
            "nbd_export_active_mappings", "Active rows in vm_export_mappings.", registry=r
        ),
        exports_live=Gauge(
            "nbd_server_exports_known",
            "Active exports the running server knows (NBD_OPT_GO; no listing).",
            registry=r,
        ),
        drift=Gauge(
            "nbd_export_reconcile_drift",
            "Differences found by the last reconciliation, by kind.",
            ["kind"],
            registry=r,
        ),
        server_pid=Gauge(
            "nbd_server_main_pid",
            "Pid of nbd-server's main process (changes on restart).",
            registry=r,
        ),
        server_info=Info("nbd_server", "The running nbd-server: version and main pid.", registry=r),
        data_path_ok=Gauge(
            "nbd_server_data_path_ok",
            "1 when the running nbd-server passed the data-path self-test, 0 when it failed "
            "(NaN before the first test).",
            registry=r,
        ),
        self_tests=Counter(
            "nbd_server_self_tests",
            "Data-path self-tests run on the server's binary, by result: passed or failed.",
            ["result"],
            registry=r,
        ),
        flushes=Counter(
            "nbd_export_flushes",
            "fsyncs of export devices (flush-export, release-export), by result.",
            ["result"],
            registry=r,
        ),
        flush_duration=Histogram(
            "nbd_export_flush_duration_seconds",
            "Time an fsync of an export's device took.",
            buckets=JOB_BUCKETS,
            registry=r,
        ),
        ready=Gauge(
            "nbd_export_worker_ready",
            "1 when a readiness check passes, 0 when it fails, by check (broker, database, "
            "nbd_server, nbd_data_path): what /readyz reports, refreshed every housekeeping "
            "round.",
            ["check"],
            registry=r,
        ),
        events=Counter(
            "nbd_export_events_published",
            "export-events confirmed by the broker, by kind (connected, disconnected).",
            ["kind"],
            registry=r,
        ),
        events_dropped=Counter(
            "nbd_export_events_dropped",
            "export-events not published, by reason: unroutable (no queue bound: nobody "
            "listens), unconfirmed (the broker did not take it within the publish budget), "
            "no_broker (not connected for that long), overflow (too many waiting).",
            ["reason"],
            registry=r,
        ),
        live_samples=Counter(
            "nbd_export_live_samples",
            "Samples of the server's connections, by result (ok, failed).",
            ["result"],
            registry=r,
        ),
        expiries=Counter(
            "nbd_export_expiries",
            "Exports whose lease or idle timeout ran out, by outcome: expired (released), "
            "forced (connections were cut first), flush_failed (left fenced, not released).",
            ["outcome"],
            registry=r,
        ),
        checksum_bytes=Counter(
            "nbd_export_checksum_bytes",
            "Bytes checksum-exports covered, zero blocks and holes included (a restarted "
            "checksum counts again).",
            registry=r,
        ),
        checksums_running=Gauge(
            "nbd_export_checksums_running",
            "checksum-exports hashing now (at most EXPORT_WORKER_CHECKSUM_CONCURRENCY; more wait).",
            registry=r,
        ),
        checksums=Counter(
            "nbd_export_checksums",
            "checksum-exports answered, by outcome: checksummed, or the error code.",
            ["outcome"],
            registry=r,
        ),
        live_sample_duration=Histogram(
            "nbd_export_live_sample_duration_seconds",
            "Wall time of one sample of the server's connections (off the event loop).",
            buckets=JOB_BUCKETS,
            registry=r,
        ),
    )
