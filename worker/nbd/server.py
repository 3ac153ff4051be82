"""NbdServer: the facade the flow, reconciliation and the commands see. It puts together
what touches the running nbd-server, each part in a module of its own:

- worker/nbd/process.py: the main process, found and checked by its pid file, its gates
  (includedir, version, data-path self-test), the SIGHUP;
- worker/nbd/probes.py: NBD_OPT_GO probes through one gate, and what each main pid is
  remembered to know; no lock (a sampler of the server's connections goes beside them);
- worker/nbd/creates.py: the create batch (ensure_export), under the reload lock;
- worker/nbd/changes.py: the other changes under that lock: align_export, repair_authfile
  and the release path (remove_export);
- worker/nbd/authfiles.py: the authfiles and the reuse path's cache of them; no lock;
- worker/nbd/flush.py: the held device descriptors and flush_export; no lock;
- worker/nbd/baseline.py: the benchmark's baseline, a subclass chosen in worker/assembly.py.

Its own: is_live and needs_reload, the reuse path's questions, answered from the files on
disk and what the probes remember.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from worker.devices import device_present
from worker.mappings import CommittedExport, CommittedLookup
from worker.metrics import Metrics
from worker.nbd.authfiles import Authfiles, AuthfileState, auth_dir_problem, authfile_path
from worker.nbd.changes import ConfigChanges
from worker.nbd.creates import CreateBatch, EnsuredExport, EnsuredExports
from worker.nbd.files import (
    DataPathOptions,
    ExportSpec,
    has_snippet,
    link_target,
    snippet_path,
)
from worker.nbd.flush import Flushes
from worker.nbd.probes import ProbeRoute, Probes
from worker.nbd.process import MainProcess, ReloadLock
from worker.nbd.selftest import SelfTestResult, run_self_test
from worker.nbd.wire import UNKNOWN, DataPathFlags, ExportState, NbdTls
from worker.settings import Settings

#: Names whose paths the reuse path remembers; past this many, forgotten all at once.
MAX_REMEMBERED_PATHS = 20_000

LOCK_FILE_NAME = ".nbd-export-worker.lock"


class NbdServer:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self.process = MainProcess(
            settings.nbd_pid_file,
            settings.nbd_conf_dir,
            pinned_config=settings.nbd_config_file,
            version_timeout_s=settings.probe_timeout_s,
            self_test=functools.partial(run_self_test, timeout_s=settings.self_test_timeout_s),
            accept_failed_self_test=settings.accept_failed_self_test,
            on_self_test=self._record_self_test,
        )
        self._options = DataPathOptions(
            flush=settings.export_flush, fua=settings.export_fua, trim=settings.export_trim
        )
        #: Every probe over TLS when set (raises TlsConfigError now, not at the first job).
        self._probes = Probes(settings, metrics, self.process)
        self._authfiles = Authfiles(settings.auth_dir, lambda: self.route().source)
        self._flushes = Flushes(metrics, self.spec)
        self._committed: CommittedLookup | None = None
        #: name -> its link and its snippet, as strings: the reuse path checks both on every
        #: job, and building them as Paths each time cost more than the two syscalls.
        self._reuse_paths: dict[str, tuple[str, str]] = {}
        # In the config directory, not /run: every worker writing this includedir must
        # see the same lock, whatever its own runtime directory is.
        lock = ReloadLock(settings.nbd_conf_dir / LOCK_FILE_NAME)
        self._creates = CreateBatch(
            settings,
            metrics,
            self.process,
            self._probes,
            self._authfiles,
            self.spec,
            self._lookup,
            lock,
        )
        self._changes = ConfigChanges(
            settings, self._authfiles, self._flushes, self.spec, self._lookup, lock
        )

    def bind_committed(self, committed: CommittedLookup) -> None:
        """Where this server reads, under its lock, what the database commits an export to:
        set once by whoever pairs it with its mappings (ExportFlow, reconcile). Raises
        ValueError when bound to another lookup already: one server, one database."""
        if self._committed is not None and self._committed != committed:
            raise ValueError("this NbdServer reads committed exports from another lookup")
        self._committed = committed

    def _lookup(self) -> CommittedLookup:
        if self._committed is None:
            raise RuntimeError("NbdServer.bind_committed() was not called")
        return self._committed

    @property
    def conf_dir(self) -> Path:
        return self._settings.nbd_conf_dir

    def spec(self, name: str) -> ExportSpec:
        return ExportSpec(
            name=name,
            link_path=self._settings.link_dir / name,
            options=self._options,
            authfile=authfile_path(self._settings.auth_dir, name),
            force_tls=self.tls,
        )

    @property
    def tls(self) -> bool:
        """Whether copy tools must connect with TLS (replies say so)."""
        return self._probes.tls_session is not None

    @property
    def tls_session(self) -> NbdTls | None:
        """How the probes do STARTTLS (None: TLS off)."""
        return self._probes.tls_session

    @property
    def options(self) -> DataPathOptions:
        return self._options

    def _record_self_test(self, pid: int, result: SelfTestResult) -> None:
        self._metrics.data_path_ok.set(1 if result.ok else 0)
        self._metrics.self_tests.labels(result="passed" if result.ok else "failed").inc()

    # --- the main process (worker/nbd/process.py) ----------------------------------------

    def main_pid_and_config(self) -> tuple[int, str]:
        return self.process.main_pid_and_config()

    def main_pid(self) -> int:
        return self.process.main_pid()

    async def check_version(self) -> tuple[int, int, int]:
        return await self.process.check_version()

    async def pass_gates(self, pid: int) -> None:
        await self.process.pass_gates(pid)

    async def gated_main_pid(self) -> int:
        return await self.process.gated_main_pid()

    async def gated_existing_pid(self) -> int:
        """The pid file's pid once it passed its gates, for the reuse path: checked
        (check_main_process) with the gates the first time only, then two stats (it
        exists) and dict lookups. Raises ServerUnavailable, UnsupportedServer or
        UnsafeServer."""
        pid = self.process.existing_pid()
        await self.process.pass_gates(pid)
        return pid

    # --- probes (worker/nbd/probes.py) ----------------------------------------------------

    def route(self) -> ProbeRoute:
        return self._probes.route()

    def remembered_names(self) -> set[str]:
        return self._probes.remembered_names()

    async def export_state(
        self, name: str, *, source: str | None = None, plain: bool = False
    ) -> ExportState:
        return await self._probes.export_state(name, source=source, plain=plain)

    async def ping(self) -> None:
        await self._probes.ping()

    async def knows(self, name: str, pid: int | None = None) -> bool:
        return await self._probes.knows(name, pid)

    async def known_names(self, names: Iterable[str]) -> set[str]:
        return await self._probes.known_names(names)

    async def export_states(self, names: Iterable[str]) -> dict[str, ExportState]:
        return await self._probes.export_states(names)

    async def data_path_flags(self, names: Iterable[str]) -> dict[str, DataPathFlags | None]:
        return await self._probes.data_path_flags(names)

    async def unprotected(
        self, exports: Mapping[str, tuple[str, ...]], *, opened_since: float | None = None
    ) -> dict[str, bool | None]:
        return await self._probes.unprotected(exports, opened_since=opened_since)

    async def plaintext_open(self, names: Iterable[str]) -> dict[str, bool | None]:
        return await self._probes.plaintext_open(names)

    # --- authfiles (worker/nbd/authfiles.py) ----------------------------------------------

    def authfile_content(self, name: str, client_addresses: tuple[str, ...] | None) -> bytes:
        return self._authfiles.content(name, client_addresses)

    def authfile_state(self, name: str, client_addresses: tuple[str, ...] | None) -> AuthfileState:
        return self._authfiles.state(name, client_addresses)

    def admits(self, name: str, client_addresses: tuple[str, ...]) -> bool:
        return self._authfiles.admits(name, client_addresses)

    def auth_dir_problem(self) -> str | None:
        """Why the running server cannot read the authfiles, if it cannot (it would then
        admit everyone to every export). Raises ServerUnavailable."""
        return auth_dir_problem(self._settings.auth_dir, self.process.main_pid())

    # --- the reuse path -------------------------------------------------------------------

    async def is_live(self, name: str, device_path: str, *, fresh: bool = True) -> bool:
        """Known to the server, its snippet on disk (so a restart keeps it), and its link
        pointing at `device_path` (so new connections open that device). `fresh=False`
        trusts what is remembered while the server answers (the reuse fast path)."""
        pid = await self.gated_existing_pid()
        paths = self._reuse_paths.get(name)
        if paths is None:
            spec = self.spec(name)  # checks the name
            paths = (str(spec.link_path), str(snippet_path(self._settings.nbd_conf_dir, name)))
            if len(self._reuse_paths) >= MAX_REMEMBERED_PATHS:
                self._reuse_paths.clear()
            self._reuse_paths[name] = paths
        link, snippet = paths
        if link_target(link) != device_path:
            return False
        if not os.path.isfile(snippet):  # noqa: ASYNC240 - one stat, as has_snippet
            return False
        return await self._server_knows(name, pid, fresh=fresh)

    async def _server_knows(self, name: str, pid: int, *, fresh: bool) -> bool:
        """Whether the server knows `name`: asked now (`fresh`), else what is remembered
        while the server answers."""
        if fresh:
            return await self._probes.export_state(name) != UNKNOWN
        await self._probes.answering(pid)
        return await self._probes.knows(name, pid)

    async def needs_reload(self, name: str) -> bool:
        """Whether making `name` serve will need a SIGHUP, judged before anything changes as
        ensure_export judges it after writing the files: no for a name the running server
        is remembered to know; yes for one it is not remembered to know whose snippet is
        not on disk (news to the server, not asked); else the server is asked. A job's
        reply says it (`reused`), so that a redelivery can repeat it after the SIGHUP was
        sent. Raises ServerUnavailable/ProbeTimeout."""
        pid = await self.gated_existing_pid()
        if name in self._probes.memory(pid).known:
            return False
        if not has_snippet(self._settings.nbd_conf_dir, name):
            return True
        return not await self._probes.knows(name, pid)

    # --- under the reload lock (worker/nbd/creates.py, worker/nbd/changes.py) -------------

    async def ensure_export(
        self, name: str, device_path: str, committed: CommittedLookup | None = None
    ) -> EnsuredExport:
        """Makes `name` known to the server, servable and opening `device_path` (CreateBatch),
        once the running server passed its gates: also when the name is known already and
        no SIGHUP follows."""
        await self.gated_existing_pid()
        return await self._creates.ensure_export(name, device_path, committed)

    async def ensure_exports(self, wanted: Mapping[str, str]) -> EnsuredExports:
        await self.gated_existing_pid()
        return await self._creates.ensure_exports(wanted)

    async def align_export(self, name: str) -> CommittedExport | None:
        return await self._changes.align_export(name)

    async def remove_export(self, name: str) -> bool:
        return await self._changes.remove_export(name)

    async def repair_authfile(self, name: str) -> bool:
        return await self._changes.repair_authfile(name)

    # --- held devices and flushes (worker/nbd/flush.py) -----------------------------------

    def close(self) -> None:
        self._flushes.close()

    async def hold_device(self, name: str, device_path: str, device_id: str) -> None:
        await self._flushes.hold_device(name, device_path, device_id)

    def let_go(self, name: str) -> None:
        self._flushes.let_go(name)

    async def flush_export(self, name: str, device_path: str, device_id: str) -> None:
        await self._flushes.flush_export(name, device_path, device_id)

    def device_present(self, device_path: str) -> bool:
        return device_present(device_path)
