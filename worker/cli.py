"""`nbd-export-worker`: the command line. It parses, loads the settings, settles the node id
and hands over to one command: the running service is worker/service.py, each operator
command a small function in worker/commands/, all assembled through worker/assembly.py.

Exit codes: worker.commands.ExitCode.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import ValidationError

from worker.asyncapi import write_asyncapi
from worker.commands import ExitCode, check, exports, health, queue, run, status
from worker.errors import WorkerError
from worker.logs import setup_logging
from worker.messages import (
    CHECKSUM_ALGORITHM,
    CHECKSUM_ALGORITHMS,
    CHECKSUM_BLOCK_SIZE,
    VM_ID_PATTERN,
    write_schemas,
)
from worker.node_identity import NodeIdentity, NodeIdError, settle_node_id
from worker.settings import Settings

log = logging.getLogger("worker")
T = TypeVar("T")

#: A command: what it does with the settings, its arguments and the node identity.
Command = Callable[[Settings, argparse.Namespace, NodeIdentity], Coroutine[Any, Any, int]]

COMMANDS: dict[str, Command] = {
    "run": lambda settings, _args, _identity: run.run(settings),
    "migrate": lambda settings, _args, _identity: run.migrate_database(settings),
    "status": lambda settings, args, _identity: status.status(settings, args),
    "reconcile": lambda settings, args, _identity: exports.reconcile_exports(settings, args),
    "release": lambda settings, args, _identity: exports.release(settings, args),
    "flush": lambda settings, args, _identity: exports.flush(settings, args),
    "inspect": lambda settings, args, _identity: exports.inspect(settings, args),
    "checksum": lambda settings, args, _identity: exports.checksum(settings, args),
    "self-test": lambda settings, args, _identity: exports.self_test(settings, args),
    "check": lambda settings, _args, identity: check.check(settings, identity),
    "healthcheck": lambda settings, args, _identity: health.healthcheck(settings, args),
    "request": lambda settings, args, _identity: queue.request(settings, args),
    "dead-letters": lambda settings, args, _identity: queue.dead_letters(settings, args),
}


def _vm_id(value: str) -> str:
    if not re.fullmatch(VM_ID_PATTERN, value):
        raise argparse.ArgumentTypeError("expected 8-4-4-4-12 hex digits")
    return value.lower()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nbd-export-worker",
        description="Prepares NBD exports of VM disks for migration jobs. Settings come from "
        "EXPORT_WORKER_* environment variables (see docs/operations.md). Exit codes: 0 ok, "
        "1 failure, 2 usage or settings, 3 nbd-server must not be used (too old, or failed "
        "the data-path self-test), 4 no reply in time.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("run", help="consume prepare-export jobs until SIGTERM/SIGINT")
    commands.add_parser("migrate", help="create the database if missing and apply migrations")
    status = commands.add_parser(
        "status", help="mappings with their live state (known, servable, link, device)"
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
    release.add_argument(
        "--mode",
        choices=("safe", "drain", "force"),
        default="safe",
        help="with connections open: safe changes nothing (exit 1, export_in_use), drain "
        "fences and waits --wait seconds for them to end, force cuts them (default: safe)",
    )
    release.add_argument(
        "--wait", type=float, default=30.0, help="drain: seconds to wait (default 30)"
    )
    flush = commands.add_parser(
        "flush", help="fsync an export's device, as a flush-export job does (exit 1 on failure)"
    )
    flush.add_argument("--vm-id", required=True, type=_vm_id)
    flush.add_argument("--disk", type=int, required=True, help="disk_unit_number")
    checksum = commands.add_parser(
        "checksum",
        help="flush an export's device and print its checksum, as a checksum-export job "
        "answers (ovirt-imageio's; exit 1 on failure)",
    )
    checksum.add_argument("--vm-id", required=True, type=_vm_id)
    checksum.add_argument("--disk", type=int, required=True, help="disk_unit_number")
    checksum.add_argument("--algorithm", default=CHECKSUM_ALGORITHM, choices=CHECKSUM_ALGORITHMS)
    checksum.add_argument("--block-size", type=int, default=CHECKSUM_BLOCK_SIZE)
    inspect = commands.add_parser(
        "inspect",
        help="an export's mapping and live state (connections, bytes written, idle), as an "
        "inspect-export job answers (exit 1 when it is not active)",
    )
    inspect.add_argument("--vm-id", required=True, type=_vm_id)
    inspect.add_argument("--disk", type=int, required=True, help="disk_unit_number")
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
        "schemas",
        help="write the JSON Schemas of the messages (default: schema/messages) and the "
        "AsyncAPI document beside them (schema/asyncapi.yaml)",
    )
    schemas.add_argument("--out", type=Path, default=Path("schema/messages"))
    return parser


def _load_settings() -> Settings | str:
    """The settings from the environment, or why they are invalid (without the values:
    they may hold a password, a URL's credentials)."""
    unknown = Settings.unknown_variables(os.environ)
    if unknown:
        return f"unknown settings (misspelled?): {', '.join(unknown)}"
    try:
        return Settings()
    except ValidationError as exc:
        problems = [
            f"  {'.'.join(str(part) for part in error['loc']) or 'settings'}: {error['msg']}"
            for error in exc.errors(include_url=False, include_input=False)
        ]
        return "invalid settings:\n" + "\n".join(problems)


def event_loop_runner(
    choice: Literal["auto", "uvloop", "asyncio"],
) -> Callable[[Coroutine[Any, Any, T]], T]:
    """asyncio.run, or uvloop's: EXPORT_WORKER_EVENT_LOOP. uvloop (the `fast` extra) cut the
    worker's CPU per reuse by about a tenth (bench/profile.py --rounds); without it the
    worker runs the same on asyncio's loop. Raises ImportError for `uvloop` when it is not
    installed."""
    if choice == "asyncio":
        return asyncio.run
    try:
        import uvloop  # optional: only when asked for or present
    except ImportError:
        if choice == "uvloop":
            raise ImportError(
                "EXPORT_WORKER_EVENT_LOOP=uvloop, but uvloop is not installed "
                "(pip install 'nbd-export-worker[fast]')"
            ) from None
        return asyncio.run
    return uvloop.run


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = _load_settings()
    if isinstance(settings, str):
        print(settings, file=sys.stderr)
        return ExitCode.USAGE
    setup_logging(settings.log_format, settings.log_level)
    try:
        identity = settle_node_id(settings, persist=args.command == "run")
    except NodeIdError as exc:
        print(f"invalid settings: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    settings = identity.settings
    if args.command == "run":
        for problem in (identity.unsaved, identity.container_warning()):
            if problem:
                log.warning(
                    "Node id %s may change on the next start: %s", settings.node_id, problem
                )
    if args.command == "show-config":
        print(json.dumps(settings.masked(), indent=2, sort_keys=True))
        return ExitCode.OK
    if args.command == "schemas":
        for path in [*write_schemas(args.out), write_asyncapi(args.out.parent / "asyncapi.yaml")]:
            print(path)
        return ExitCode.OK
    command = COMMANDS[args.command]
    try:
        run = event_loop_runner(settings.event_loop)
    except ImportError as exc:
        print(f"invalid settings: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    with contextlib.suppress(KeyboardInterrupt):
        try:
            return run(command(settings, args, identity))
        except WorkerError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return ExitCode.FAILURE
    return ExitCode.FAILURE
