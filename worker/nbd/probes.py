"""Probes of the running server: NBD_OPT_GO as a client would, from the probes' address,
and what is remembered of each main pid.

It never lists exports (the server may refuse LIST to everyone: `allowlist = false`):
whether the server knows a name is asked per name with NBD_OPT_GO, and remembered per main
pid, since a running server never forgets a name. The reuse path trusts what is remembered
while one shared probe, at most every `answer_ttl_s`, shows the server still answers.

Every probe of one process passes one gate (PROBES_AT_ONCE), whoever asks. No probe takes
the reload lock. What samples the server's connections (its per-connection children) belongs
beside this module.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from worker.access import admits
from worker.errors import ProbeTimeout, ServerUnavailable, WorkerError
from worker.metrics import Metrics
from worker.nbd.process import MainProcess
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

#: NBD_OPT_GO probes in flight at once from one process, whoever asks: each forks a child
#: in the server, whose accept backlog is 10; 130 handshakes at once saw 50-85 time out.
PROBES_AT_ONCE = 8
#: Asked to show the server answers: no export has it (ours start with "migration-vm-").
HEALTH_PROBE_NAME = "nbd-export-worker-health-probe"
#: An IPv4 loopback address no authfile of ours admits (unless a job admits all of
#: 127.0.0.0/8): an export that opens from here does not read its authfile.
CANARY_ADDRESS_V4 = "127.255.255.254"
T = TypeVar("T")


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


class Probes:
    """NBD_OPT_GO probes of the server at `settings.nbd_host`, and what they found, kept per
    main pid (`process` tells the pid: a restart forgets everything)."""

    def __init__(self, settings: Settings, metrics: Metrics, process: MainProcess) -> None:
        self._settings = settings
        self._metrics = metrics
        self._process = process
        self._remembered = _Remembered(0, set(), {}, {})
        #: Every probe over TLS when set (raises TlsConfigError now, not at the first job).
        self._tls = nbd_tls_session(settings)
        self._route: ProbeRoute | None = None
        #: Every probe of this process passes here (export_state), so no caller, however
        #: many exports it asks about, can open more than PROBES_AT_ONCE at once.
        self._probe_gate = asyncio.Semaphore(PROBES_AT_ONCE)
        self._heartbeat: asyncio.Task[ExportState] | None = None
        self._asking: dict[str, asyncio.Task[ExportState]] = {}

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

    def remembered_names(self) -> set[str]:
        """Names the running server is known to have, without asking it."""
        return set(self.memory().known)

    async def timed_probe(self, probe: Awaitable[T]) -> T:
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

    def memory(self, pid: int | None = None) -> _Remembered:
        """What is remembered of the running server (or of `pid`, just read); forgotten
        when its pid changes."""
        if pid is None:
            try:
                pid = self._process.existing_pid()
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
            state = await self.timed_probe(
                export_state(
                    route.host,
                    route.port,
                    name,
                    self._settings.probe_timeout_s,
                    source=source or route.source,
                    tls=None if plain else self._tls,
                )
            )
        memory = self.memory()
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

    async def answering(self, pid: int) -> None:
        """Returns at once when the server (`pid`) answered within `answer_ttl_s`; else one
        probe, shared by every caller (single flight). Raises ServerUnavailable/ProbeTimeout."""
        if time.monotonic() - self.memory(pid).answered_at < self._settings.answer_ttl_s:
            return
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.create_task(self.export_state(HEALTH_PROBE_NAME))
        # Shielded: one caller's cancellation must not cancel the probe the others await.
        await asyncio.shield(self._heartbeat)

    async def knows(self, name: str, pid: int | None = None) -> bool:
        """Whether the running server knows `name` (loaded, maybe released since): what
        is remembered, else asked, once for every caller asking about that name at the
        same time. Raises ServerUnavailable/ProbeTimeout."""
        if name in self.memory(pid).known:
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
        await self.export_states(names - self.memory().known)
        return names & self.memory().known

    async def data_path_flags(self, names: Iterable[str]) -> dict[str, DataPathFlags | None]:
        """What each export offers copy tools, as the server advertises it (None: it does
        not open). Asked once per export and server pid: a reload never changes them."""
        names = list(names)
        # export_state() keeps the flags of every export that opens.
        await self.export_states(n for n in names if n not in self.memory().flags)
        flags = self.memory().flags
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
        memory = self.memory()
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
        memory = self.memory()
        try:
            states = await self.export_states(
                (n for n in names if n not in memory.tls_only), plain=True
            )
        except WorkerError as exc:  # cannot be told now: never a reason to stop
            log.warning("Cannot tell which exports refuse plain clients: %s", exc)
            states = {}
        for name, state in states.items():
            if state == TLS_REQUIRED or isinstance(state, ExportInfo):
                memory.tls_only[name] = state == TLS_REQUIRED
        return {n: None if n not in memory.tls_only else not memory.tls_only[n] for n in names}

    async def export_states(
        self, names: Iterable[str], *, plain: bool = False
    ) -> dict[str, ExportState]:
        """NBD_OPT_GO on each name (`plain`: without TLS; asked afresh, remembered like
        every probe): whether the server knows it and whether it opens, in one probe each.
        A few at a time: every connection costs the server a fork, and a burst must not
        swamp the server that serves live migrations. The first error ends the batch."""

        async def ask(name: str) -> ExportState:
            return await self.export_state(name, plain=plain)

        return await _in_lanes(list(dict.fromkeys(names)), ask)
