"""NbdServer: the facade the flow and the CLI see (is_live, admits, ensure_export(s),
admit, remove_export, flush_export).

It owns the order of a create: authfile, link, snippet, SIGHUP to the verified main
process, then NBD_OPT_GO on each new name until the server opens it as a client would, all
under the reload lock. It never lists exports (the server may refuse LIST to everyone:
`allowlist = false`): whether the server knows a name is asked per name with NBD_OPT_GO,
and remembered per main pid, since a running server never forgets a name. Two things make
it fast: creates that arrive while a reload is being prepared join one batch (one lock
hold, one SIGHUP, one verification), and the reuse path trusts what it remembers while
one shared probe, at most every `answer_ttl_s`, shows the server still answers.

Over 400 lines as one class on purpose: the create batch, the probes and what they remember
per pid share one reload lock and one memory; split across modules, that state would have
to be handed around.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import ipaddress
import logging
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from worker.access import admits
from worker.devices import HeldDevices, device_present, device_size, fsync_device, open_device
from worker.errors import (
    ConfigWriteError,
    ExportNotVisible,
    FlushFailed,
    ProbeTimeout,
    RestartRequired,
    ServerUnavailable,
    Superseded,
    WorkerError,
)
from worker.faults import crash_point
from worker.mappings import CommittedExport
from worker.metrics import Metrics
from worker.nbd.files import (
    AuthfileState,
    DataPathOptions,
    ExportSpec,
    SnippetWrite,
    authfile_path,
    authfile_state,
    fsync_dir,
    has_snippet,
    link_target,
    nearest_existing,
    point_link,
    remove_export_files,
    render_authfile,
    searchable_by,
    write_authfile,
    write_snippet,
)
from worker.nbd.probe import list_exports
from worker.nbd.process import MainProcess, ReloadLock, file_credentials
from worker.nbd.selftest import SelfTestResult, run_self_test
from worker.nbd.wire import (
    TLS_REQUIRED,
    UNKNOWN,
    DataPathFlags,
    ExportInfo,
    ExportState,
    NbdTls,
    export_state,
)
from worker.settings import Settings

log = logging.getLogger(__name__)

LOCK_FILE_NAME = ".nbd-export-worker.lock"

#: NBD_OPT_GO probes in flight at once from one process, whoever asks: each forks a child
#: in the server, whose accept backlog is 10; 130 handshakes at once saw 50-85 time out.
PROBES_AT_ONCE = 8
#: Asked to show the server answers: no export has it (ours start with "migration-vm-").
HEALTH_PROBE_NAME = "nbd-export-worker-health-probe"
#: An IPv4 loopback address no authfile of ours admits (unless a job admits all of
#: 127.0.0.0/8): an export that opens from here does not read its authfile.
CANARY_ADDRESS_V4 = "127.255.255.254"
#: Authfiles whose last good reading is kept for the reuse path (then forgotten at once).
MAX_REMEMBERED_DOORS = 20_000
T = TypeVar("T")


async def in_daemon_thread(fn: Callable[[], T]) -> T:
    """Runs `fn` on a daemon thread of its own: an fsync may block for as long as its volume
    takes, and must not starve the default executor (config writes) nor hold up the
    worker's shutdown (though a thread stuck in the kernel keeps the process from ending)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return  # the awaiting job was cancelled (shutdown)
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result = fn()
        except BaseException as exc:
            outcome: tuple[T | None, BaseException | None] = (None, exc)
        else:
            outcome = (result, None)
        # The loop may be gone by now (the worker stopped while the volume hung).
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=run, name="fsync", daemon=True).start()
    return await future


#: Looks up, in the database, what an export is committed to (None: not active).
CommittedDevice = Callable[[str], Awaitable[CommittedExport | None]]


def invalid_clients(name: str, exc: ValueError) -> ConfigWriteError:
    """A corrupt client_addresses column: never guess who may connect."""
    return ConfigWriteError("write the authfile of", name, f"invalid client_addresses ({exc})")


@dataclass(frozen=True)
class Ensured:
    #: name -> the device its link now opens (exports no longer active are left out)
    linked: dict[str, str]
    sighup_sent: bool
    #: False when everything was already in place: another job or worker did the work.
    changed: bool


@dataclass
class _PendingCreate:
    name: str
    device_path: str
    committed: CommittedDevice
    result: asyncio.Future[Ensured]


@dataclass(frozen=True)
class ProbeRoute:
    """How the worker's probes reach the server."""

    #: The server's address (nbd_host resolved once) and port.
    host: str
    port: int
    #: The local address probes connect from: every active export's authfile admits it.
    source: str
    #: A local address no authfile admits, to tell exports that ignore theirs (None: no
    #: such address for this family: IPv6 has one loopback address only).
    canary: str | None


def probe_route(host: str, port: int, source: str = "") -> ProbeRoute:
    """Resolves `host` and finds the source address the kernel picks for it (a connected
    UDP socket sends nothing). Raises ServerUnavailable."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        server_ip = str(address[0])
        if not source:
            with socket.socket(family, socket.SOCK_DGRAM) as udp:
                udp.connect((server_ip, port))
                source = str(udp.getsockname()[0])
    except OSError as exc:
        raise ServerUnavailable(
            f"cannot find a route to nbd-server at {host}:{port}: {exc}"
        ) from exc
    return ProbeRoute(server_ip, port, source, canary_for(server_ip, source))


def canary_for(server_ip: str, source: str) -> str | None:
    """An address to tell exports that ignore their authfile from, when there is one: only
    a server on IPv4 loopback can be reached from another loopback address (from 127/8 to
    another host, connect() fails with EINVAL)."""
    if not ipaddress.ip_address(server_ip).is_loopback or ":" in server_ip:
        return None
    return CANARY_ADDRESS_V4 if source != CANARY_ADDRESS_V4 else None


@functools.lru_cache(maxsize=4096)
def _authfile_for(name: str, client_addresses: tuple[str, ...], source: str) -> bytes:
    # Cached: the reuse path compares every job's authfile, and parsing the addresses
    # again costs more than reading the file.
    return render_authfile(name, [*client_addresses, source])


@dataclass
class _Remembered:
    """What the running server (one main pid) is known to have: names it knows (a name is
    never forgotten until a restart), what each offers, and whether each reads its
    authfile (fixed when the export was loaded)."""

    pid: int
    known: set[str]
    flags: dict[str, DataPathFlags]
    unprotected: dict[str, bool]
    #: Whether each refuses plain clients (`force_tls`, fixed when it was loaded).
    tls_only: dict[str, bool] = field(default_factory=dict)
    #: When each last opened from the probes' address (time.monotonic()).
    opened_at: dict[str, float] = field(default_factory=dict)
    answered_at: float = float("-inf")


def nbd_tls_session(settings: Settings) -> NbdTls | None:
    """How probes do STARTTLS with these settings (None: TLS off). Raises TlsConfigError."""
    files = settings.nbd_tls_files
    if files is None:
        return None
    return NbdTls(files.client_context("NBD"), settings.nbd_tls_server_name or settings.nbd_host)


async def _in_lanes(names: Sequence[str], ask: Callable[[str], Awaitable[T]]) -> dict[str, T]:
    """`ask` about each name, PROBES_AT_ONCE lanes taking the next name in turn. Lanes, not
    a task per name: a batch of 2,000 then keeps only a few probes waiting for the probe
    gate, and a job's probe that arrives meanwhile waits for those, not for the whole
    batch. The first error cancels the other lanes and is raised as it is."""
    answers: dict[str, T] = {}
    pending = iter(names)

    async def lane() -> None:
        for name in pending:
            answers[name] = await ask(name)

    try:
        async with asyncio.TaskGroup() as lanes:
            for _ in range(min(PROBES_AT_ONCE, len(names))):
                lanes.create_task(lane())
    except BaseExceptionGroup as group:
        raise group.exceptions[0] from None
    return {name: answers[name] for name in names}


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
        self._remembered = _Remembered(0, set(), {}, {})
        #: Every probe over TLS when set (raises TlsConfigError now, not at the first job).
        self._tls = nbd_tls_session(settings)
        self._route: ProbeRoute | None = None
        #: Every probe of this process passes here (export_state), so no caller, however
        #: many exports it asks about, can open more than PROBES_AT_ONCE at once.
        self._probe_gate = asyncio.Semaphore(PROBES_AT_ONCE)
        self._heartbeat: asyncio.Task[ExportState] | None = None
        self._asking: dict[str, asyncio.Task[ExportState]] = {}
        #: name -> (the authfile's identity when last found right, its content then).
        self._doors: dict[str, tuple[tuple[int, int, int, int], bytes]] = {}
        self._held = HeldDevices()
        # In the config directory, not /run: every worker writing this includedir must
        # see the same lock, whatever its own runtime directory is.
        self._lock = ReloadLock(settings.nbd_conf_dir / LOCK_FILE_NAME)
        self._pending: list[_PendingCreate] = []
        self._drainer: asyncio.Task[None] | None = None
        self._committed: CommittedDevice | None = None

    def bind_committed(self, committed: CommittedDevice) -> None:
        """Where this server reads, under its lock, what the database commits an export to:
        set once by whoever pairs it with its mappings (ExportFlow, reconcile). Raises
        ValueError when bound to another lookup already: one server, one database."""
        if self._committed is not None and self._committed != committed:
            raise ValueError("this NbdServer reads committed exports from another lookup")
        self._committed = committed

    def _lookup(self) -> CommittedDevice:
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
            force_tls=self._tls is not None,
        )

    @property
    def tls(self) -> bool:
        """Whether copy tools must connect with TLS (replies say so)."""
        return self._tls is not None

    @property
    def tls_session(self) -> NbdTls | None:
        """How the probes do STARTTLS (None: TLS off)."""
        return self._tls

    def route(self) -> ProbeRoute:
        """Resolved once (raises ServerUnavailable until it can be)."""
        if self._route is None:
            settings = self._settings
            self._route = probe_route(
                settings.nbd_host, settings.nbd_port, settings.probe_source_address
            )
        return self._route

    def authfile_content(self, name: str, client_addresses: tuple[str, ...] | None) -> bytes:
        """The authfile `name` must have: `client_addresses` and the probes' own address
        (None: released, nobody may connect)."""
        if client_addresses is None:
            return render_authfile(name, [])
        return _authfile_for(name, client_addresses, self.route().source)

    def auth_dir_problem(self) -> str | None:
        """Why the running server cannot read the authfiles, if it cannot (it would then
        admit everyone to every export). Raises ServerUnavailable."""
        pid = self.process.verified_pid()
        uid, gids = file_credentials(pid)
        # Before the first run it may not exist yet: run makes it (and any missing parent)
        # 0755, so the directories above it decide.
        if searchable_by(nearest_existing(self._settings.auth_dir), uid, gids):
            return None
        return (
            f"nbd-server (pid {pid}, uid {uid}) cannot enter {self._settings.auth_dir}: it "
            "admits everyone to every export; make the directory and those above it "
            "searchable by that user"
        )

    def remembered_names(self) -> set[str]:
        """Names the running server is known to have, without asking it."""
        return set(self._memory().known)

    def admitted(self, committed: CommittedExport) -> tuple[str, ...]:
        """Who a committed export admits. Raises ValueError on a corrupt column."""
        return committed.admitted()

    @property
    def options(self) -> DataPathOptions:
        return self._options

    def _record_self_test(self, pid: int, result: SelfTestResult) -> None:
        self._metrics.data_path_ok.set(1 if result.ok else 0)
        self._metrics.self_tests.labels(result="passed" if result.ok else "failed").inc()

    async def vetted_pid(self) -> int:
        """The running main pid once it passed the version and data-path gates (a dict
        lookup after the first time). Raises ServerUnavailable, UnsupportedServer or
        UnsafeServer."""
        pid = self.process.running_pid()
        await self.process.vet(pid)
        return pid

    # --- probes ---------------------------------------------------------------------------

    async def listed_exports(self) -> frozenset[str]:
        """Names `nbd-client -l` lists: the original system's check, for the baseline only
        (it needs `allowlist = true`). Raises ServerUnavailable/ProbeTimeout."""
        settings = self._settings
        return await self._timed_probe(
            list_exports(
                settings.nbd_client_bin,
                settings.nbd_host,
                settings.nbd_port,
                settings.probe_timeout_s,
            )
        )

    async def _timed_probe(self, probe: Awaitable[T]) -> T:
        started = time.monotonic()
        try:
            return await probe
        except ProbeTimeout:
            self._metrics.probe_failures.labels(reason="timeout").inc()
            raise
        except ServerUnavailable:
            self._metrics.probe_failures.labels(reason="unavailable").inc()
            raise
        finally:
            self._metrics.probe_duration.observe(time.monotonic() - started)

    def _memory(self, pid: int | None = None) -> _Remembered:
        """What is remembered of the running server (or of `pid`, just read); forgotten
        when its pid changes."""
        if pid is None:
            try:
                pid = self.process.running_pid()
            except ServerUnavailable:
                pid = 0
        if self._remembered.pid != pid:
            self._remembered = _Remembered(pid, set(), {}, {})
        return self._remembered

    async def export_state(
        self, name: str, *, source: str | None = None, plain: bool = False
    ) -> ExportState:
        """Opens the export as a client would (NBD_OPT_GO), from the probes' address (or
        `source`): its size and flags, or why not. At most PROBES_AT_ONCE at a time; the
        wait for a turn is not part of the probe's deadline. Raises
        ServerUnavailable/ProbeTimeout."""
        route = self.route()
        async with self._probe_gate:
            state = await self._timed_probe(
                export_state(
                    route.host,
                    route.port,
                    name,
                    self._settings.probe_timeout_s,
                    source=source or route.source,
                    tls=None if plain else self._tls,
                )
            )
        memory = self._memory()
        memory.answered_at = time.monotonic()
        if source is None and not plain and state != UNKNOWN:
            memory.known.add(name)
            if isinstance(state, ExportInfo):
                memory.flags[name] = state.flags
                memory.opened_at[name] = memory.answered_at
        return state

    async def ping(self) -> None:
        """Raises ServerUnavailable/ProbeTimeout unless the server answers an NBD_OPT_GO."""
        await self.export_state(HEALTH_PROBE_NAME)

    async def _answering(self, pid: int) -> None:
        """Returns at once when the server (`pid`) answered within `answer_ttl_s`; else one
        probe, shared by every caller (single flight). Raises ServerUnavailable/ProbeTimeout."""
        if time.monotonic() - self._memory(pid).answered_at < self._settings.answer_ttl_s:
            return
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.create_task(self.export_state(HEALTH_PROBE_NAME))
        # Shielded: one caller's cancellation must not cancel the probe the others await.
        await asyncio.shield(self._heartbeat)

    async def knows(self, name: str, pid: int | None = None) -> bool:
        """Whether the running server knows `name` (loaded, maybe released since): what
        is remembered, else asked, once for every caller asking about that name at the
        same time. Raises ServerUnavailable/ProbeTimeout."""
        if name in self._memory(pid).known:
            return True
        asking = self._asking.get(name)
        if asking is None:
            asking = asyncio.create_task(self.export_state(name))
            self._asking[name] = asking
            asking.add_done_callback(lambda _: self._asking.pop(name, None))
        return await asyncio.shield(asking) != UNKNOWN

    async def known_names(self, names: Iterable[str]) -> set[str]:
        """Those of `names` the running server knows; only names not yet remembered are
        asked, a few at a time."""
        names = set(names)
        await self._export_states(names - self._memory().known)
        return names & self._memory().known

    async def export_states(self, names: Iterable[str]) -> dict[str, ExportState]:
        """NBD_OPT_GO on each name (asked afresh, remembered like every probe): whether the
        server knows it and whether it opens, in one probe each."""
        return await self._export_states(names)

    async def data_path_flags(self, names: Iterable[str]) -> dict[str, DataPathFlags | None]:
        """What each export offers copy tools, as the server advertises it (None: it does
        not open). Asked once per export and server pid: a reload never changes them."""
        names = list(names)
        # export_state() keeps the flags of every export that opens.
        await self._export_states(n for n in names if n not in self._memory().flags)
        flags = self._memory().flags
        return {name: flags.get(name) for name in names}

    async def unprotected(
        self, exports: Mapping[str, tuple[str, ...]], *, opened_since: float | None = None
    ) -> dict[str, bool | None]:
        """For each export (name -> the addresses it admits): True when it opens from an
        address its authfile does not admit, i.e. the server loaded it without an
        `authfile` line (before the worker wrote one; only a restart adds it); False when
        that address is refused; None when it cannot be told (the export does not open,
        no such address, or the export admits it). Known answers are kept per server pid.

        A refusal means something only from an export that opens for the probes: one seen
        to open since `opened_since` (time.monotonic(): the caller's own pass) is not asked
        again, which spares a probe per export when a pass has just opened them all."""
        memory = self._memory()
        canary = self.route().canary
        fresh = float("inf") if opened_since is None else opened_since

        async def ask(name: str) -> bool | None:
            if name in memory.unprotected:
                return memory.unprotected[name]
            if canary is None or admits(exports[name], canary):
                return None
            try:
                opened = memory.opened_at.get(name, float("-inf")) >= fresh
                if not opened and not isinstance(await self.export_state(name), ExportInfo):
                    return None
                state = await self.export_state(name, source=canary)
            except WorkerError as exc:  # cannot be told now: never a reason to stop
                log.warning("Cannot tell whether %s reads its authfile: %s", name, exc)
                return None
            if state == UNKNOWN:
                return None
            memory.unprotected[name] = isinstance(state, ExportInfo)
            return memory.unprotected[name]

        return await _in_lanes(list(exports), ask)

    async def plaintext_open(self, names: Iterable[str]) -> dict[str, bool | None]:
        """For each export: True when a plain (non-TLS) client can open it, i.e. it was
        loaded before the worker wrote `force_tls` (only a restart adds it); False when it
        refuses plain clients; None when it cannot be told (it does not open, or the server
        does not answer). Known answers are kept per server pid."""
        names = list(names)
        memory = self._memory()
        try:
            states = await self._export_states(
                (n for n in names if n not in memory.tls_only), plain=True
            )
        except WorkerError as exc:  # cannot be told now: never a reason to stop
            log.warning("Cannot tell which exports refuse plain clients: %s", exc)
            states = {}
        for name, state in states.items():
            if state == TLS_REQUIRED or isinstance(state, ExportInfo):
                memory.tls_only[name] = state == TLS_REQUIRED
        return {n: None if n not in memory.tls_only else not memory.tls_only[n] for n in names}

    def authfile_state(self, name: str, client_addresses: tuple[str, ...] | None) -> AuthfileState:
        """Whether `name`'s authfile admits exactly `client_addresses` (None: nobody)."""
        return authfile_state(
            authfile_path(self._settings.auth_dir, name),
            self.authfile_content(name, client_addresses),
        )

    def admits(self, name: str, client_addresses: tuple[str, ...]) -> bool:
        """Whether `name`'s authfile is in place and admits exactly these addresses: for
        the reuse path, one lstat when the file is as it was last read and found right
        (a change moves its ctime, which no one can set; on kernels without fine-grained
        timestamps a change within the same clock tick, a few ms, could go unseen until
        the next), else a small read."""
        path = authfile_path(self._settings.auth_dir, name)
        expected = self.authfile_content(name, client_addresses)
        try:
            st = os.lstat(path)
        except OSError:
            return False
        key = (st.st_ino, st.st_ctime_ns, st.st_size, st.st_mode)
        if self._doors.get(name) == (key, expected):
            return True
        if authfile_state(path, expected) is not AuthfileState.OK:
            return False
        if len(self._doors) >= MAX_REMEMBERED_DOORS:
            self._doors.clear()
        self._doors[name] = (key, expected)
        return True

    async def is_live(self, name: str, device_path: str, *, fresh: bool = True) -> bool:
        """Known to the server, its snippet on disk (so a restart keeps it), and its link
        pointing at `device_path` (so new connections open that device). `fresh=False`
        trusts what is remembered while the server answers (the reuse fast path)."""
        pid = await self.vetted_pid()
        spec = self.spec(name)
        if link_target(spec.link_path) != device_path:
            return False
        if not has_snippet(self._settings.nbd_conf_dir, name):
            return False
        if self._settings.baseline:
            # The original system: one `nbd-client -l` per job.
            return name in await self.listed_exports()
        if fresh:
            return await self.export_state(name) != UNKNOWN
        await self._answering(pid)
        return await self.knows(name, pid)

    # --- creates --------------------------------------------------------------------------

    async def needs_reload(self, name: str) -> bool:
        """Whether making `name` serve will need a SIGHUP, judged before anything changes as
        ensure_export judges it after writing the files: no for a name the running server
        is remembered to know; yes for one it is not remembered to know whose snippet is
        not on disk (news to the server, not asked); else the server is asked. A job's
        reply says it (`reused`), so that a redelivery can repeat it after the SIGHUP was
        sent. Raises ServerUnavailable/ProbeTimeout."""
        pid = await self.vetted_pid()
        if name in self._memory(pid).known:
            return False
        if not has_snippet(self._settings.nbd_conf_dir, name):
            return True
        return not await self.knows(name, pid)

    async def ensure_export(
        self, name: str, device_path: str, committed: CommittedDevice | None = None
    ) -> Ensured:
        """Makes `name` listed, servable and opening `device_path`, in a batch with the
        creates that arrive meanwhile. Raises Superseded when the database no longer commits
        the export to `device_path` (another job changed it meanwhile), ServerUnavailable,
        ExportNotVisible, ConfigWriteError (retryable) or RestartRequired (UnsafeServer when
        the server must not be used). `committed`: a lookup of this call's own instead of
        the bound one (kept for tests/integration/test_server_safety.py)."""
        await self.vetted_pid()  # also when the name is known already and no SIGHUP follows
        committed = committed or self._lookup()
        if self._settings.baseline:
            ensured = await self._ensure_locked({name: device_path}, committed)
        else:
            result: asyncio.Future[Ensured] = asyncio.get_running_loop().create_future()
            self._pending.append(_PendingCreate(name, device_path, committed, result))
            if self._drainer is None or self._drainer.done():
                # A context of its own: the batch serves many jobs, and its log lines must
                # not carry the fields of whichever job happened to start it.
                self._drainer = asyncio.create_task(self._drain(), context=contextvars.Context())
            ensured = await result
        if ensured.linked.get(name) != device_path:
            raise Superseded(name)
        return ensured

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
                error = self._lock_timeout()
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
                if isinstance(outcome, Ensured):
                    item.result.set_result(outcome)
                else:
                    item.result.set_exception(outcome)

    async def ensure_exports(self, wanted: Mapping[str, str]) -> Ensured:
        """Reconciliation's create: every export in one lock hold and at most one SIGHUP.
        Exports the database no longer has active are skipped. Raises the first error."""
        await self.vetted_pid()
        return await self._ensure_locked(wanted, self._lookup())

    async def _ensure_locked(
        self, wanted: Mapping[str, str], committed: CommittedDevice
    ) -> Ensured:
        try:
            async with self._lock.hold(self._settings.lock_timeout_s) as waited_s:
                self._metrics.lock_wait.observe(waited_s)
                results = await self._ensure_batch({n: (d, committed) for n, d in wanted.items()})
        except TimeoutError:
            raise self._lock_timeout() from None
        linked: dict[str, str] = {}
        sighup_sent = changed = False
        for outcome in results.values():
            if isinstance(outcome, WorkerError):
                raise outcome
            linked.update(outcome.linked)
            sighup_sent |= outcome.sighup_sent
            changed |= outcome.changed
        return Ensured(linked, sighup_sent=sighup_sent, changed=changed)

    def _lock_timeout(self) -> ServerUnavailable:
        return ServerUnavailable(
            f"the config lock was not free within {self._settings.lock_timeout_s:g} s"
        )

    async def _ensure_batch(
        self, items: Mapping[str, tuple[str, CommittedDevice]]
    ) -> dict[str, Ensured | WorkerError]:
        """The create steps for a batch; the caller holds the reload lock.

        Each export is pointed at the device the database commits it to *now*, and admits
        whom the database says (read under the lock, so two workers cannot leave a link or
        an authfile disagreeing with its row). Whether the
        server knows a name, before and after the SIGHUP, is asked with NBD_OPT_GO on that
        name: one short connection whatever the number of exports (a listing carries every
        name: ~20 ms with 1,000 exports), and it proves the export opens. Errors are per
        export where they can be, for the whole batch where they cannot.
        """
        results: dict[str, Ensured | WorkerError] = {}
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
                results[name] = Ensured({}, sighup_sent=False, changed=False)
            else:
                try:
                    authfiles[name] = self.authfile_content(name, self.admitted(committed))
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
            remembered = self._memory().known
            fresh = {name for name in created if name not in remembered}
            states: dict[str, ExportState] = dict.fromkeys(fresh, UNKNOWN)
            states |= await self._export_states(name for name in linked if name not in fresh)
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
                results[name] = Ensured(
                    {name: device_path},
                    sighup_sent=name in missing,
                    changed=name in changed or name in missing,
                )
        return results

    async def _export_states(
        self, names: Iterable[str], *, plain: bool = False
    ) -> dict[str, ExportState]:
        """NBD_OPT_GO on each name (`plain`: without TLS), a few at a time: every
        connection costs the server a fork, and a burst must not swamp the server that
        serves live migrations. The first error ends the batch."""

        async def ask(name: str) -> ExportState:
            return await self.export_state(name, plain=plain)

        return await _in_lanes(list(dict.fromkeys(names)), ask)

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
            spec = self.spec(name)
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
            pid = await self.process.send_reload()
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
            states[sentinel] = await self.export_state(sentinel)
            if states[sentinel] != UNKNOWN:
                states |= await self._export_states(waiting - {sentinel})
                waiting = {name for name in waiting if states[name] == UNKNOWN}
            if not waiting:
                break
            if not self.process.is_alive(pid):
                raise ServerUnavailable(f"nbd-server main process {pid} died after SIGHUP")
            if time.monotonic() >= deadline:
                raise ExportNotVisible(
                    f"nbd-server did not add {', '.join(sorted(waiting))} within "
                    f"{self._settings.reload_timeout_s:g} s of SIGHUP; see the server log "
                    "(one unparsable snippet makes a reload add nothing)"
                )
            await asyncio.sleep(self._settings.reload_poll_interval_s)
        self._metrics.reload_visible.observe(time.monotonic() - sent)
        if not self.process.is_alive(pid):
            raise ServerUnavailable(f"nbd-server main process {pid} died after SIGHUP")
        return states

    # --- other changes --------------------------------------------------------------------

    async def align_export(self, name: str) -> CommittedExport | None:
        """Makes the export's link and authfile agree with its row, read under the lock: a
        reuse with other client addresses (the next connection is judged by the new
        authfile, no reload), or the undoing of a failed relink. Returns what the row
        commits the export to; a row no longer active (None) removes the export as a
        release does."""
        try:
            async with self._lock.hold(self._settings.lock_timeout_s):
                found = await self._lookup()(name)
                if found is None:
                    await self._remove_files(name)
                    return None
                spec = self.spec(name)
                content = self.authfile_content(name, self.admitted(found))
                assert spec.authfile is not None
                await asyncio.to_thread(write_authfile, spec.authfile, content)
                await asyncio.to_thread(point_link, spec.link_path, found.device_path)
                return found
        except TimeoutError:
            raise self._lock_timeout() from None
        except ValueError as exc:  # a corrupt client_addresses column
            raise invalid_clients(name, exc) from exc

    async def remove_export(self, name: str) -> bool:
        """Closes the export unless the database (read under the lock) has it active again;
        True if it did. Its authfile is emptied first, so new connections are refused at
        once although the server keeps the name until it restarts; then its snippet and
        link go. Established connections keep their device."""
        try:
            async with self._lock.hold(self._settings.lock_timeout_s):
                if await self._lookup()(name) is not None:
                    return False
                await self._remove_files(name)
                return True
        except TimeoutError:
            raise self._lock_timeout() from None

    async def _remove_files(self, name: str) -> None:
        spec = self.spec(name)
        assert spec.authfile is not None
        # Emptied, never deleted: a missing authfile admits everyone. Not created for a
        # name that never had any file (a release of what was never prepared).
        if await asyncio.to_thread(self._has_files, spec):
            content = self.authfile_content(name, None)
            await asyncio.to_thread(write_authfile, spec.authfile, content)
        await asyncio.to_thread(remove_export_files, self._settings.nbd_conf_dir, spec)
        self._held.drop(name)

    def _has_files(self, spec: ExportSpec) -> bool:
        assert spec.authfile is not None
        return (
            os.path.lexists(spec.authfile)
            or os.path.lexists(spec.link_path)
            or has_snippet(self._settings.nbd_conf_dir, spec.name)
        )

    async def repair_authfile(self, name: str) -> bool:
        """Rewrites the export's authfile from its row, read under the lock (an inactive
        or missing row: nobody may connect). True if it wrote."""
        try:
            async with self._lock.hold(self._settings.lock_timeout_s):
                found = await self._lookup()(name)
                try:
                    admitted = None if found is None else self.admitted(found)
                except ValueError:
                    admitted = None  # a corrupt column: nobody, never a guess
                spec = self.spec(name)
                assert spec.authfile is not None
                content = self.authfile_content(name, admitted)
                return await asyncio.to_thread(write_authfile, spec.authfile, content)
        except TimeoutError:
            raise self._lock_timeout() from None

    def close(self) -> None:
        """Lets go of the held device descriptors (the worker is stopping)."""
        self._held.close()

    async def hold_device(self, name: str, device_path: str, device_id: str) -> None:
        """Opens the export's device through its link and keeps it open, so that a later
        flush sees every writeback error from now on (HeldDevices); a dict lookup once
        held. Best effort: when it cannot (the device is gone, no descriptors left), a
        flush sees only errors nobody else was told of."""
        if self._held.holds(name, device_id):
            return
        try:
            link = self._checked_link(name, device_path)
            # Off the loop: opening a block device can block (a rescan, a hung path).
            fd = await asyncio.to_thread(open_device, link, device_id)
        except FlushFailed as exc:
            log.warning("Cannot hold the device of %s: %s", name, exc)
            return
        self._held.put(name, device_id, fd)

    def let_go(self, name: str) -> None:
        """Closes the descriptor held for a released export."""
        self._held.drop(name)

    async def flush_export(self, name: str, device_path: str, device_id: str) -> None:
        """fsync()s the export's device: the descriptor held since the export was prepared,
        then one opened now through its link (so it is the device new connections open),
        once the link is seen to point at `device_path` and open `device_id`. Raises
        FlushFailed naming the errno."""
        try:
            try:
                path = self._checked_link(name, device_path)
            except FlushFailed:
                if link_target(self.spec(name).link_path) is not None:
                    raise  # it points at another device
                # No link (half-removed): the device the mapping names is what was written.
                path = Path(device_path)
            held = self._held.dup(name, device_id)
            started = time.monotonic()
            try:
                await in_daemon_thread(lambda: fsync_device(path, device_id, held))
            finally:
                self._metrics.flush_duration.observe(time.monotonic() - started)
        except FlushFailed:
            self._metrics.flushes.labels(result="failed").inc()
            raise
        self._metrics.flushes.labels(result="flushed").inc()

    def device_present(self, device_path: str) -> bool:
        return device_present(device_path)

    def _checked_link(self, name: str, device_path: str) -> Path:
        """The export's link, once it points at `device_path`. Raises FlushFailed."""
        link = self.spec(name).link_path
        target = link_target(link)
        if target != device_path:
            raise FlushFailed(
                f"the link of {name} points at {target or 'nothing'}, not {device_path}: "
                "nothing was flushed; reconciliation repairs the link"
            )
        return link
