"""Prometheus metrics: one registry per worker, built here, served on /metrics.

Labels take bounded values only (actions, outcomes), never job or VM ids.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

#: Jobs span ~1 ms (reuse) to seconds (a create on a busy server).
JOB_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


@dataclass(frozen=True)
class Metrics:
    registry: CollectorRegistry
    jobs: Counter
    job_duration: Histogram
    sighups: Counter
    sighup_failures: Counter
    reload_visible: Histogram
    lock_wait: Histogram
    probe_duration: Histogram
    probe_failures: Counter
    in_flight: Gauge


def build_metrics() -> Metrics:
    registry = CollectorRegistry()
    return Metrics(
        registry=registry,
        jobs=Counter(
            "nbd_export_jobs",
            "Jobs handled, by outcome (the action taken, or failed/invalid).",
            ["outcome"],
            registry=registry,
        ),
        job_duration=Histogram(
            "nbd_export_job_duration_seconds",
            "Time from receiving a job to its reply being confirmed.",
            buckets=JOB_BUCKETS,
            registry=registry,
        ),
        sighups=Counter(
            "nbd_server_sighups", "SIGHUPs sent to nbd-server's main process.", registry=registry
        ),
        sighup_failures=Counter(
            "nbd_server_sighup_failures",
            "Reloads that could not be sent (main process missing or not verified).",
            registry=registry,
        ),
        reload_visible=Histogram(
            "nbd_server_reload_visible_seconds",
            "Time from a SIGHUP until every new export is listed.",
            buckets=JOB_BUCKETS,
            registry=registry,
        ),
        lock_wait=Histogram(
            "nbd_export_config_lock_wait_seconds",
            "Time spent waiting for the config/reload lock.",
            buckets=JOB_BUCKETS,
            registry=registry,
        ),
        probe_duration=Histogram(
            "nbd_server_probe_duration_seconds",
            "Duration of listing probes of nbd-server.",
            buckets=JOB_BUCKETS,
            registry=registry,
        ),
        probe_failures=Counter(
            "nbd_server_probe_failures",
            "Listing probes that failed or timed out.",
            registry=registry,
        ),
        in_flight=Gauge("nbd_export_jobs_in_flight", "Jobs being handled now.", registry=registry),
    )


def serve_metrics(metrics: Metrics, host: str, port: int) -> None:
    """Serves /metrics from a daemon thread; port 0 means off."""
    if port:
        start_http_server(port, addr=host, registry=metrics.registry)
