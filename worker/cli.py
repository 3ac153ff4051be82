"""`nbd-export-worker`: the command line, and the only place that wires objects together.

Exit codes: 0 success; 1 a runtime failure (service unreachable, migration failed);
2 bad usage or settings; 3 the nbd-server must not be used (too old);
4 `request` got no reply in time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

import aio_pika
from pydantic import ValidationError

from worker.consumer import JobConsumer
from worker.devices import DevicePolicy
from worker.errors import UnsupportedServer, WorkerError
from worker.flow import ExportFlow
from worker.messages import write_schemas
from worker.metrics import Metrics, build_metrics, serve_metrics
from worker.nbd.process import format_version
from worker.nbd.server import NbdServer
from worker.repository import Repository, migrate
from worker.requester import request_export
from worker.settings import Settings, mask_url

log = logging.getLogger("worker")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_UNSUPPORTED_SERVER = 3
EXIT_TIMEOUT = 4


async def serve(
    settings: Settings,
    stop: asyncio.Event,
    *,
    metrics: Metrics | None = None,
    started: asyncio.Event | None = None,
) -> None:
    """Runs the worker until `stop` is set, then drains in-flight jobs and closes.

    Raises UnsupportedServer before touching anything when nbd-server is older than 3.25.
    """
    metrics = metrics or build_metrics()
    server = NbdServer(settings, metrics)
    version = await server.process.check_version()
    log.info(
        "nbd-server %s main pid=%d config=%s",
        format_version(version),
        server.process.verified_pid(),
        settings.nbd_config_file,
    )
    settings.link_dir.mkdir(parents=True, exist_ok=True)
    repository = await Repository.connect(
        settings.database_url,
        pool_size=settings.db_pool_size,
        timeout_s=settings.db_connect_timeout_s,
    )
    try:
        connection = await aio_pika.connect_robust(
            settings.amqp_url, timeout=settings.db_connect_timeout_s
        )
        async with connection:
            # Confirms: a job is acked only after its reply is safely with the broker.
            # on_return_raises: an unroutable reply raises instead of vanishing.
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            flow = ExportFlow(
                repository,
                server,
                DevicePolicy(settings.device_roots, settings.allow_regular_files),
                nbd_host=settings.nbd_host,
                nbd_port=settings.nbd_port,
            )
            consumer = JobConsumer(
                channel,
                flow,
                metrics,
                request_queue=settings.request_queue,
                reply_queue=settings.reply_queue,
                prefetch=settings.prefetch,
                delivery_limit=settings.delivery_limit,
                publish_timeout_s=settings.publish_timeout_s,
            )
            await consumer.start()
            serve_metrics(metrics, settings.metrics_host, settings.metrics_port)
            log.info(
                "Worker ready broker=%s metrics_port=%d",
                mask_url(settings.amqp_url),
                settings.metrics_port,
            )
            if started is not None:
                started.set()
            await stop.wait()
            log.info("Stopping: no new jobs; draining those in flight")
            await consumer.stop(settings.shutdown_grace_s)
    finally:
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


async def _request(settings: Settings, args: argparse.Namespace) -> int:
    job = {
        "job_id": args.job_id or f"cli-{uuid.uuid4().hex[:12]}",
        "vm_id": args.vm_id,
        "vm_name": args.vm_name,
        "disk_unit_number": args.disk,
        "device_path": args.device,
    }
    try:
        reply = await request_export(
            settings.amqp_url, settings.request_queue, job, timeout_s=args.timeout
        )
    except TimeoutError:
        print(f"no reply within {args.timeout:g} s (is the worker running?)", file=sys.stderr)
        return EXIT_TIMEOUT
    print(json.dumps(reply, indent=2))
    return EXIT_OK if reply.get("status") == "ready" else EXIT_FAILURE


async def _migrate(settings: Settings) -> int:
    try:
        applied = await migrate(settings.database_url, timeout_s=settings.db_connect_timeout_s)
    except WorkerError as exc:
        log.critical("Migration failed: %s", exc)
        return EXIT_FAILURE
    print(f"applied {len(applied)} migration(s)" + (": " + ", ".join(applied) if applied else ""))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nbd-export-worker",
        description="Prepares NBD exports of VM disks for migration jobs. Settings come from "
        "EXPORT_WORKER_* environment variables (see README).",
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("run", help="consume prepare-export jobs until SIGTERM/SIGINT")
    commands.add_parser("migrate", help="create the database if missing and apply migrations")
    commands.add_parser("show-config", help="print the effective settings, secrets masked")
    request = commands.add_parser(
        "request",
        help="publish one prepare-export job and print its reply (exit 1 on an error reply)",
    )
    request.add_argument("--vm-id", required=True)
    request.add_argument("--vm-name", required=True)
    request.add_argument("--disk", type=int, default=0, help="disk_unit_number (default 0)")
    request.add_argument("--device", required=True, help="device_path on the appliance")
    request.add_argument("--job-id", help="default: cli-<random>")
    request.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
    schemas = commands.add_parser(
        "schemas", help="write the JSON Schemas of the messages (default: schema/messages)"
    )
    schemas.add_argument("--out", type=Path, default=Path("schema/messages"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"invalid settings:\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "show-config":
        print(json.dumps(settings.masked(), indent=2, sort_keys=True))
        return EXIT_OK
    if args.command == "schemas":
        for path in write_schemas(args.out):
            print(path)
        return EXIT_OK
    with contextlib.suppress(KeyboardInterrupt):
        if args.command == "run":
            return asyncio.run(_run(settings))
        if args.command == "request":
            return asyncio.run(_request(settings, args))
        return asyncio.run(_migrate(settings))
    return EXIT_FAILURE
