"""`check`: the pre-flight checks, every problem found, not just the first."""

from __future__ import annotations

import configparser
import contextlib
import ipaddress
import os
import ssl
from collections.abc import Mapping, Sequence
from pathlib import Path

import aio_pika

from worker.access import all_loopback
from worker.assembly import adapters, build_server
from worker.commands import ExitCode
from worker.errors import ServerMisconfigured, WorkerError
from worker.metrics import build_metrics
from worker.nbd.files import worker_dir_problem
from worker.nbd.main_config import (
    DEFAULT_CONFIG_FILE,
    generic_section,
    includedir_problem,
    main_config_generic,
    read_server_config,
)
from worker.nbd.process import format_version
from worker.nbd.selftest import HOW_TO_FIX, run_self_test
from worker.nbd.server import NbdServer
from worker.nbd.tls_selftest import TLS_FILE_KEYS, TLS_PRIORITY, ServerTlsFiles, run_tls_close_test
from worker.node_identity import NODE_ID_FILE, NodeIdentity, NodeIdSource
from worker.reconcile import reconcile
from worker.repository import latest_migration_version
from worker.settings import Settings, mask_url
from worker.tls import TlsConfigError


async def check(settings: Settings, identity: NodeIdentity) -> int:
    """Pre-flight: every problem found, not just the first."""
    results: list[tuple[str, str | None]] = []
    warnings: list[tuple[str, str]] = []
    try:
        server = build_server(settings, build_metrics(settings.node_id))
    except TlsConfigError as exc:
        print(f"FAIL {exc}")
        return ExitCode.FAILURE
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

    pid: int | None = None
    config: str | None = None
    misconfigured = False
    try:
        pid, config = server.main_pid_and_config()
        version = await server.check_version()
        results.append((f"nbd-server main process {pid}, version {format_version(version)}", None))
        # The same self-test `run` gates on, run afresh on the very binary the server runs.
        verdict = await run_self_test(f"/proc/{pid}/exe", timeout_s=settings.self_test_timeout_s)
        problem = None if verdict.ok else verdict.summary()
        if problem and settings.accept_failed_self_test:
            problem += " (the worker uses it anyway: EXPORT_WORKER_ACCEPT_FAILED_SELF_TEST)"
        results.append(("nbd-server data path (self-test of its binary)", problem))
    except ServerMisconfigured as exc:
        # Said once: the checks that read its config or ask it would only repeat it.
        results.append(("nbd-server main process runs with the pinned config", str(exc)))
        misconfigured = True
    except WorkerError as exc:
        results.append(("nbd-server main process, version and data path", str(exc)))
    generic: Mapping[str, str] = {}
    if not misconfigured:
        config_result, generic = _server_config(settings, pid, config)
        results.append(config_result)
    for label, directory in (
        ("link directory", settings.link_dir),
        ("authfile directory", settings.auth_dir),
    ):
        # `run` creates these itself: missing is fine where it could.
        results.append((f"{label} {directory} writable", worker_dir_problem(directory)))
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
    if not misconfigured:
        try:
            access, mapped = await _access_results(settings, server)
            results += access
        except WorkerError as exc:
            results.append(("every export's authfile in place, readable and right", str(exc)))
        warnings += _exposure_warnings(settings, generic, mapped)
    if settings.nbd_tls and not misconfigured:
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
            connection = await aio_pika.connect(url, timeout=settings.amqp_connect_timeout_s)
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
        async with adapters(settings) as (repository, _):
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
    return ExitCode.OK if all(problem is None for _, problem in results) else ExitCode.FAILURE


def _server_config(
    settings: Settings, pid: int | None, config: str | None
) -> tuple[tuple[str, str | None], Mapping[str, str]]:
    """The config check's result, and the config's [generic] section ({} if unreadable).
    With a main process: the config it runs with, read as it reads it. Without one: the
    pinned or default config, so that a set-up is checked before the server starts."""
    conf_dir = settings.nbd_conf_dir
    label = f"includedir is EXPORT_WORKER_NBD_CONF_DIR ({conf_dir}), a writable directory"
    generic: Mapping[str, str] = {}
    problem: str | None = None
    if pid is not None and config is not None:
        try:
            generic = main_config_generic(pid, config)
            problem = includedir_problem(generic, conf_dir)
        except ServerMisconfigured as exc:
            problem = str(exc)
    else:
        path = settings.nbd_config_file or Path(DEFAULT_CONFIG_FILE)
        label += f" (no verified main process: {path} read instead)"
        try:
            generic = generic_section(read_server_config(path))
            problem = includedir_problem(generic, conf_dir)
        except (OSError, configparser.Error) as exc:
            problem = f"cannot read {path}: {exc}"
    if problem is None and not (conf_dir.is_dir() and os.access(conf_dir, os.W_OK | os.X_OK)):
        problem = f"{conf_dir} is missing or not writable"
    return (label, problem), generic


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
            pid = server.main_pid()
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
    async with adapters(settings) as (repository, _):
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
