"""Commands on exports, for when no worker runs or an operator must act now: `reconcile`,
`release`, `flush`, `inspect`, `checksum` (each as the worker would run it) and
`self-test`."""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from typing import Any

from pydantic import ValidationError

from worker.assembly import (
    adapters,
    build_checksums,
    build_flow,
    build_live,
    build_server,
    run_in_flow,
)
from worker.commands import ExitCode
from worker.errors import ExportInUse
from worker.jobs import JobLedger
from worker.messages import ChecksumExport, ExportFailed, FlushExport, InspectExport, ReleaseExport
from worker.metrics import build_metrics
from worker.nbd.selftest import run_self_test
from worker.reconcile import reconcile
from worker.replies import describe_validation_error
from worker.settings import Settings


async def reconcile_exports(settings: Settings, args: argparse.Namespace) -> int:
    async with adapters(settings) as (repository, server):
        report = await reconcile(repository, server, dry_run=args.dry_run, thorough=True)
    print("\n".join(report.lines()))
    return ExitCode.OK


def _disk_job(args: argparse.Namespace) -> dict[str, Any]:
    """The fields of a release-export or flush-export job the command line runs itself."""
    return {
        "job_id": f"cli-{uuid.uuid4().hex[:12]}",
        "vm_id": args.vm_id,
        "disk_unit_number": args.disk,
    }


async def flush(settings: Settings, args: argparse.Namespace) -> int:
    """The same flush as a flush-export job."""
    request = FlushExport(type="flush-export", **_disk_job(args))
    flushed = await run_in_flow(settings, lambda flow: flow.flush_export(request))
    print(flushed.model_dump_json(indent=2))
    return ExitCode.OK


async def checksum(settings: Settings, args: argparse.Namespace) -> int:
    """The same checksum as a checksum-export job (flushed, then hashed through the
    export's link), computed by this process. Exit 1 when it fails."""
    try:
        request = ChecksumExport(
            type="checksum-export",
            algorithm=args.algorithm,
            block_size=args.block_size,
            **_disk_job(args),
        )
    except ValidationError as exc:
        print(f"invalid_request: {describe_validation_error(exc)}", file=sys.stderr)
        return ExitCode.USAGE
    metrics = build_metrics(settings.node_id)
    async with adapters(settings) as (repository, server):
        live = build_live(settings, repository, server, metrics, keep=False)
        flow = build_flow(settings, repository, server, JobLedger(repository), live)
        reply = await build_checksums(settings, repository, flow, metrics).run_now(request)
    print(reply.model_dump_json(indent=2))
    if isinstance(reply, ExportFailed):
        print(f"{reply.error.code}: {reply.error.message}", file=sys.stderr)
        return ExitCode.FAILURE
    return ExitCode.OK


async def inspect(settings: Settings, args: argparse.Namespace) -> int:
    """The same answer as an inspect-export job: the mapping and its live state, sampled
    now by this process (which keeps nothing: only the running worker counts into
    export_usage). Exit 1 when the disk has no active export on this node."""
    request = InspectExport(type="inspect-export", **_disk_job(args))
    status = await run_in_flow(settings, lambda flow: flow.inspect_export(request))
    print(status.model_dump_json(indent=2))
    if status.export_status != "active":
        print(
            f"vm {args.vm_id} disk {args.disk}: {status.export_status} on this node",
            file=sys.stderr,
        )
        return ExitCode.FAILURE
    return ExitCode.OK


async def self_test(settings: Settings, args: argparse.Namespace) -> int:
    """The data-path self-test of a binary, or of the running server's (/proc/PID/exe)."""
    binary = args.binary
    if binary is None:
        server = build_server(settings, build_metrics(settings.node_id))
        binary = f"/proc/{server.main_pid()}/exe"
    result = await run_self_test(str(binary), timeout_s=settings.self_test_timeout_s)
    print(result.summary())
    return ExitCode.OK if result.ok else ExitCode.FAILURE


async def release(settings: Settings, args: argparse.Namespace) -> int:
    """The same release as a release-export job."""
    request = ReleaseExport(
        type="release-export", mode=args.mode, wait_s=args.wait, **_disk_job(args)
    )
    try:
        released = await run_in_flow(settings, lambda flow: flow.release_export(request))
    except ExportInUse as exc:
        print(
            json.dumps([c.model_dump(mode="json") for c in exc.connections], indent=2),
        )
        print(f"export_in_use: {exc}", file=sys.stderr)
        return ExitCode.FAILURE
    print(released.model_dump_json(indent=2))
    if not released.was_active:
        print(f"no active mapping for vm {args.vm_id} disk {args.disk}", file=sys.stderr)
        return ExitCode.FAILURE
    return ExitCode.OK
