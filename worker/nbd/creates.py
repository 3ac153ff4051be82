"""The create batch: authfile, link, snippet, SIGHUP to the checked main process, then
NBD_OPT_GO on each new name until the server opens it as a client would, all under the
reload lock.

Creates that arrive while a reload is being prepared join one batch (one lock hold, one
SIGHUP, one verification); each job keeps its own result. Each export is pointed at the
device the database commits it to when the lock is held (read through the bound lookup),
so a link never disagrees with its row.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from worker.devices import device_size
from worker.errors import (
    ConfigWriteError,
    ExportNotVisible,
    RestartRequired,
    ServerUnavailable,
    Superseded,
    WorkerError,
)
from worker.faults import crash_point
from worker.mappings import CommittedLookup
from worker.metrics import Metrics
from worker.nbd.authfiles import Authfiles, authfile_path, invalid_clients, write_authfile
from worker.nbd.changes import lock_timeout
from worker.nbd.files import ExportSpec, SnippetWrite, fsync_dir, point_link, write_snippet
from worker.nbd.probes import Probes
from worker.nbd.process import MainProcess, ReloadLock
from worker.nbd.wire import UNKNOWN, ExportInfo, ExportState
from worker.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EnsuredExport:
    """What ensuring one export did."""

    #: The device its link now opens (None: the export is no longer active, left out).
    device_path: str | None
    sighup_sent: bool
    #: False when everything was already in place: another job or worker did the work.
    changed: bool


@dataclass(frozen=True)
class EnsuredExports:
    """What ensuring several exports in one lock hold did (reconciliation's create)."""

    #: name -> the device its link now opens (exports no longer active are left out)
    linked: dict[str, str]
    #: Whether any of them needed the SIGHUP (one at most).
    sighup_sent: bool
    changed: bool


@dataclass
class _PendingCreate:
    name: str
    device_path: str
    committed: CommittedLookup
    result: asyncio.Future[EnsuredExport]


def _as_asked(name: str, device_path: str, outcome: EnsuredExport | WorkerError) -> EnsuredExport:
    """`outcome`, unless it is an error or the database no longer commits `name` to
    `device_path` (another job changed it meanwhile): Superseded."""
    if isinstance(outcome, WorkerError):
        raise outcome
    if outcome.device_path != device_path:
        raise Superseded(name)
    return outcome


class CreateBatch:
    """Creates, batched under the reload lock (`lock`, shared with ConfigChanges)."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        process: MainProcess,
        probes: Probes,
        authfiles: Authfiles,
        spec: Callable[[str], ExportSpec],
        lookup: Callable[[], CommittedLookup],
        lock: ReloadLock,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._process = process
        self._probes = probes
        self._authfiles = authfiles
        self._spec = spec
        self._lookup = lookup
        self._lock = lock
        self._pending: list[_PendingCreate] = []
        self._drainer: asyncio.Task[None] | None = None

    async def ensure_export(
        self, name: str, device_path: str, committed: CommittedLookup | None = None
    ) -> EnsuredExport:
        """Makes `name` known to the server, servable and opening `device_path`, in a batch
        with the creates that arrive meanwhile. Raises Superseded when the database no longer
        commits the export to `device_path` (another job changed it meanwhile), ServerUnavailable,
        ExportNotVisible, ConfigWriteError (retryable) or RestartRequired (UnsafeServer when
        the server must not be used). `committed`: a lookup of this call's own instead of
        the bound one (kept for tests/integration/test_server_safety.py)."""
        committed = committed or self._lookup()
        result: asyncio.Future[EnsuredExport] = asyncio.get_running_loop().create_future()
        self._pending.append(_PendingCreate(name, device_path, committed, result))
        if self._drainer is None or self._drainer.done():
            # A context of its own: the batch serves many jobs, and its log lines must
            # not carry the fields of whichever job happened to start it.
            self._drainer = asyncio.create_task(self._drain(), context=contextvars.Context())
        return _as_asked(name, device_path, await result)

    async def ensure_alone(
        self, name: str, device_path: str, committed: CommittedLookup | None = None
    ) -> EnsuredExport:
        """One create in a lock hold of its own, batched with nothing: the benchmark's
        baseline (a SIGHUP per create). Raises as ensure_export does."""
        results = await self._ensure_locked({name: device_path}, committed or self._lookup())
        return _as_asked(name, device_path, results[name])

    async def _drain(self) -> None:
        """Serves pending creates batch by batch: each batch is what has queued up by the
        time the lock is free, so a burst costs a few SIGHUPs, not one per job."""
        while self._pending:
            batch: dict[str, _PendingCreate] = {}
            try:
                async with self._lock.hold(self._settings.lock_timeout_s) as waited_s:
                    self._metrics.lock_wait.observe(waited_s)
                    later = []
                    for item in self._pending:
                        if item.name in batch:
                            later.append(item)  # the same export twice: next batch
                        else:
                            batch[item.name] = item
                    self._pending = later
                    results = await self._ensure_batch(
                        {n: (i.device_path, i.committed) for n, i in batch.items()}
                    )
            except TimeoutError:
                # The lock never came: every create waiting now fails alike (retryable).
                error = lock_timeout(self._settings)
                waiting = list(batch.values()) + self._pending
                self._pending = []
                for item in waiting:
                    if not item.result.done():
                        item.result.set_exception(error)
                continue
            except BaseException as exc:
                # Never leave a job waiting forever on a batch that died.
                for item in list(batch.values()) + self._pending:
                    if not item.result.done():
                        item.result.set_exception(exc)
                self._pending = []
                raise
            for name, item in batch.items():
                if item.result.done():
                    continue  # the job was cancelled (shutdown)
                outcome = results[name]
                if isinstance(outcome, EnsuredExport):
                    item.result.set_result(outcome)
                else:
                    item.result.set_exception(outcome)

    async def ensure_exports(self, wanted: Mapping[str, str]) -> EnsuredExports:
        """Reconciliation's create: every export in one lock hold and at most one SIGHUP.
        Exports the database no longer has active are skipped. Raises the first error."""
        results = await self._ensure_locked(wanted, self._lookup())
        linked: dict[str, str] = {}
        sighup_sent = changed = False
        for name, outcome in results.items():
            if isinstance(outcome, WorkerError):
                raise outcome
            if outcome.device_path is not None:
                linked[name] = outcome.device_path
            sighup_sent |= outcome.sighup_sent
            changed |= outcome.changed
        return EnsuredExports(linked, sighup_sent=sighup_sent, changed=changed)

    async def _ensure_locked(
        self, wanted: Mapping[str, str], committed: CommittedLookup
    ) -> dict[str, EnsuredExport | WorkerError]:
        try:
            async with self._lock.hold(self._settings.lock_timeout_s) as waited_s:
                self._metrics.lock_wait.observe(waited_s)
                return await self._ensure_batch({n: (d, committed) for n, d in wanted.items()})
        except TimeoutError:
            raise lock_timeout(self._settings) from None

    async def _ensure_batch(
        self, items: Mapping[str, tuple[str, CommittedLookup]]
    ) -> dict[str, EnsuredExport | WorkerError]:
        """The create steps for a batch; the caller holds the reload lock.

        Each export is pointed at the device the database commits it to *now*, and admits
        whom the database says (read under the lock, so two workers cannot leave a link or
        an authfile disagreeing with its row). Whether the
        server knows a name, before and after the SIGHUP, is asked with NBD_OPT_GO on that
        name: one short connection whatever the number of exports (a listing carries every
        name: ~20 ms with 1,000 exports), and it proves the export opens. Errors are per
        export where they can be, for the whole batch where they cannot.
        """
        results: dict[str, EnsuredExport | WorkerError] = {}
        names = list(items)
        devices = await asyncio.gather(
            *(items[name][1](name) for name in names), return_exceptions=True
        )
        linked: dict[str, str] = {}
        authfiles: dict[str, bytes] = {}
        for name, committed in zip(names, devices, strict=True):
            if isinstance(committed, WorkerError):
                results[name] = committed
            elif isinstance(committed, BaseException):
                raise committed
            elif committed is None:
                results[name] = EnsuredExport(None, sighup_sent=False, changed=False)
            else:
                try:
                    authfiles[name] = self._authfiles.content(name, committed.doors())
                except ValueError as exc:  # a corrupt column: never guess who may connect
                    results[name] = invalid_clients(name, exc)
                    continue
                linked[name] = committed.device_path
        try:
            changed, replaced, created = await asyncio.to_thread(
                self._write_files, linked, authfiles
            )
            if changed:
                crash_point("after_snippet")
            # A snippet we just created is news to the server unless the name is still in
            # its memory (released, then prepared again) as far as we know. Everything else
            # is asked.
            remembered = self._probes.memory().known
            fresh = {name for name in created if name not in remembered}
            states: dict[str, ExportState] = dict.fromkeys(fresh, UNKNOWN)
            states |= await self._probes.export_states(name for name in linked if name not in fresh)
        except WorkerError as exc:
            return results | dict.fromkeys(linked, exc)
        for name in sorted(n for n in replaced if states[n] != UNKNOWN):
            results[name] = RestartRequired(name, "is served from an older config")
            del linked[name]
        # Names the server knows already (a create that crashed before its reply, another
        # worker's create) need no reload: a reload would not change them anyway.
        missing = {name for name in linked if states[name] == UNKNOWN}
        if missing:
            try:
                states |= await self._reload_until_known(missing)
            except WorkerError as exc:
                for name in missing:
                    results[name] = exc
                    del linked[name]
        sizes = await asyncio.gather(
            *(asyncio.to_thread(device_size, device) for device in linked.values())
        )
        for (name, device_path), expected in zip(linked.items(), sizes, strict=True):
            state = states[name]
            if not isinstance(state, ExportInfo):
                results[name] = ExportNotVisible(
                    f"nbd-server knows {name} but refuses to open it (device {device_path} "
                    "not readable by the server?)"
                )
            elif expected is not None and state.size != expected:
                results[name] = RestartRequired(
                    name,
                    f"serves {state.size} bytes but {device_path} has {expected} (the server "
                    "opens another path for it)",
                )
            else:
                results[name] = EnsuredExport(
                    device_path,
                    sighup_sent=name in missing,
                    changed=name in changed or name in missing,
                )
        return results

    def _write_files(
        self, exports: Mapping[str, str], authfiles: Mapping[str, bytes]
    ) -> tuple[set[str], set[str], set[str]]:
        """Authfiles, links and snippets; returns the names where anything changed, those
        whose snippet had other content, and those whose snippet is new."""
        changed, replaced, created = set(), set(), set()
        # Authfiles first, durably (their directory too): a snippet names its authfile, and
        # a reload (ours, another worker's, a restart after a crash) that loads a snippet
        # whose authfile is missing admits everyone.
        for name in exports:
            door = authfile_path(self._settings.auth_dir, name)
            if write_authfile(door, authfiles[name], sync_dir=False):
                changed.add(name)
        if changed:
            try:
                fsync_dir(self._settings.auth_dir)
            except OSError as exc:
                raise ConfigWriteError("sync", "the authfile directory", exc.strerror) from exc
        for name, device_path in exports.items():
            spec = self._spec(name)
            # Each file is written and fsynced before its rename; the two directories are
            # fsynced once for the batch, below, before anyone relies on them.
            if point_link(spec.link_path, device_path, sync_dir=False):
                changed.add(name)
            outcome = write_snippet(self._settings.nbd_conf_dir, spec, sync_dir=False)
            if outcome is not SnippetWrite.UNCHANGED:
                changed.add(name)
            if outcome is SnippetWrite.CREATED:
                created.add(name)
                log.info("Added dynamic export to NBD config export_name=%s", name)
            elif outcome is SnippetWrite.REPLACED:
                replaced.add(name)
            elif outcome is SnippetWrite.OPTIONS_CHANGED:
                log.warning(
                    "Rewrote the snippet of %s with the current options (data path, "
                    "authfile); a loaded export keeps its old ones until nbd-server restarts "
                    "export_name=%s",
                    name,
                    name,
                )
        if changed:
            try:
                fsync_dir(self._settings.link_dir)
                fsync_dir(self._settings.nbd_conf_dir)
            except OSError as exc:
                raise ConfigWriteError("sync", "the config directories", exc.strerror) from exc
        return changed, replaced, created

    async def _reload_until_known(self, names: set[str]) -> dict[str, ExportState]:
        """SIGHUPs the main process and polls, with NBD_OPT_GO, until the server knows
        every name; returns their states. The main process must still be alive after."""
        try:
            pid = await self._process.send_reload()
        except ServerUnavailable:
            self._metrics.sighup_failures.inc()
            raise
        self._metrics.sighups.inc()
        crash_point("after_sighup")
        sent = time.monotonic()
        log.info("Sent SIGHUP to nbd-server main process pid=%d exports=%d", pid, len(names))
        deadline = sent + self._settings.reload_timeout_s
        states: dict[str, ExportState] = {}
        waiting = set(names)
        while True:
            # The reload is asynchronous: with many exports the first probe after the
            # signal often misses the new ones (nbd-server-facts.md). It is also
            # all-or-nothing, so one name tells when it is done; then the rest are asked.
            sentinel = min(waiting)
            states[sentinel] = await self._probes.export_state(sentinel)
            if states[sentinel] != UNKNOWN:
                states |= await self._probes.export_states(waiting - {sentinel})
                waiting = {name for name in waiting if states[name] == UNKNOWN}
            if not waiting:
                break
            if not self._process.is_main_process(pid):
                raise ServerUnavailable(f"nbd-server main process {pid} died after SIGHUP")
            if time.monotonic() >= deadline:
                raise ExportNotVisible(
                    f"nbd-server did not add {', '.join(sorted(waiting))} within "
                    f"{self._settings.reload_timeout_s:g} s of SIGHUP; see the server log "
                    "(one unparsable snippet makes a reload add nothing)"
                )
            await asyncio.sleep(self._settings.reload_poll_interval_s)
        self._metrics.reload_visible.observe(time.monotonic() - sent)
        if not self._process.is_main_process(pid):
            raise ServerUnavailable(f"nbd-server main process {pid} died after SIGHUP")
        return states
