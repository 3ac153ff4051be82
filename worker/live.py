"""The live view of every export: who is connected, how much was written and read through
it, how long it has been idle. Built from samples of nbd-server's per-connection children
(worker/nbd/connections.py): read-only, never on a job's path.

What is counted, per connection: `bytes_written`, the data the copy tool wrote (the child's
`write_bytes`, capped by its `wchar`: zeroes, which the project's build writes with
fallocate, and trims add nothing); `bytes_read`, what it read (the child's reads less what
it received from the socket: for a plain connection its `rchar` less its written data; the
request headers, 28 bytes a request, are counted as read). Per export: every connection's,
plus those of the connections that ended, so totals never go back: when connections end
between two samples, the bytes they moved after the last one are recovered from the main
process, whose counters grow by a child's whole counters when it reaps it (split between
the connections that ended in that interval in proportion to what each moved in the
interval before, exact when one export's connections end). A connection that begins and
ends between two samples is not seen; its bytes then go to `unattributed`.

Over 400 lines (budget 600) on purpose: one sample's accounting (connections begun, ended
with their tails, relinked devices, totals that never go back) is one algorithm whose parts
must agree.

Thread-safety: sample() runs in a worker thread (asyncio.to_thread), everything else on the
event loop; they share nothing but immutable snapshots, swapped in one assignment.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from worker.nbd.connections import (
    CLOCK_TICKS,
    ChildSample,
    DeviceKey,
    IoCounters,
    SocketEnds,
    boot_time,
    children,
    path_device_key,
    read_io,
    sample_child,
    socket_peers,
)


def data_counts(io: IoCounters, tls: bool) -> tuple[int, int]:
    """(written, read) from a child's counters: see the module's docstring."""
    # write_bytes counts a whole page-cache folio each time a write dirties it, so a copy
    # made while writeback runs counts folios again (+6 % in a copy with `sync` looping,
    # +14-24 % with 256 KiB writes); wchar counts every byte the child wrote through
    # write(2) (its pwrites, and a plain connection's replies), never a folio twice.
    written = min(io.write_bytes, io.wchar)
    # A plain connection's socket reads are in rchar (read(2)); TLS reads go through
    # recv(2), which rchar does not count.
    read = io.rchar if tls else io.rchar - written
    return written, max(read, 0)


@dataclass(frozen=True)
class Tracked:
    """An active export the view follows, as its mapping says."""

    export_name: str
    vm_id: str
    disk_unit_number: int
    #: The export's link: the device it opens now.
    link: Path
    tls: bool
    #: When the copy these counts belong to was prepared (a new create starts from zero).
    prepared_at: datetime
    planned_bytes: int | None = None


@dataclass(frozen=True)
class Usage:
    """What the view keeps of an export across worker restarts (export_usage)."""

    export_name: str
    prepared_at: datetime
    connections_total: int = 0
    bytes_written: int = 0
    bytes_read: int = 0
    ended_written: int = 0
    ended_read: int = 0
    last_io_at: datetime | None = None
    event_seq: int = 0
    #: The connections open when it was kept, as (pid, start ticks, written, read): counted
    #: already; one that ended while no worker ran is ended with these counts.
    open_connections: tuple[tuple[int, int, int, int], ...] = ()


@dataclass(frozen=True)
class ConnectionView:
    client_address: str
    client_port: int
    connected_at: datetime
    tls: bool
    #: False: opened before a relink, so it writes the export's previous device.
    current_device: bool
    bytes_written: int
    bytes_read: int
    pid: int


@dataclass(frozen=True)
class ExportView:
    export_name: str
    connections: tuple[ConnectionView, ...]
    connections_total: int
    bytes_written: int
    bytes_read: int
    last_io_at: datetime | None
    idle_seconds: float
    device_size: int | None
    planned_bytes: int | None
    sampled_at: datetime

    @property
    def progress(self) -> float | None:
        """Written over planned, at most 1.0; None without a plan (nothing is invented)."""
        if not self.planned_bytes:
            return None
        return min(1.0, self.bytes_written / self.planned_bytes)


@dataclass(frozen=True)
class ConnectionEvent:
    """A connection of an export began or ended (published as an export-event)."""

    kind: str  # "connected" | "disconnected"
    seq: int
    at: datetime
    tracked: Tracked
    connection: ConnectionView
    export: ExportView


@dataclass
class _Connection:
    key: tuple[int, int]
    client: tuple[str, int]
    connected_at: datetime
    current_device: bool
    #: The device it holds open.
    device: DeviceKey | None
    io: IoCounters
    #: What it moved in the interval before the last sample (its share of a tail).
    moved: int = 0
    #: Counted already (open when the worker last kept the export's usage).
    known: bool = False

    def view(self, tls: bool) -> ConnectionView:
        written, read = data_counts(self.io, tls)
        return ConnectionView(
            client_address=self.client[0],
            client_port=self.client[1],
            connected_at=self.connected_at,
            tls=tls,
            current_device=self.current_device,
            bytes_written=written,
            bytes_read=read,
            pid=self.key[0],
        )


@dataclass
class _Export:
    tracked: Tracked
    usage: Usage
    device: DeviceKey | None = None
    #: Devices the export opened before a relink, while connections still hold them.
    previous: set[DeviceKey] = field(default_factory=set)
    device_size: int | None = None
    connections: dict[tuple[int, int], _Connection] = field(default_factory=dict)
    #: The totals last shown: what is shown never goes back.
    shown: tuple[int, int] = (0, 0)
    #: Changed since it was last kept (export_usage).
    dirty: bool = False
    kept_at: float = 0.0
    #: Connections that were open when a previous worker kept the usage, by (pid, start
    #: ticks): their (written, read) then, until the first sample sees whether they live.
    restored: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)


def _device_size(link: Path) -> int | None:
    """The size of what `link` opens: a regular file's length, a block device's size."""
    try:
        with open(link, "rb") as device:
            return device.seek(0, 2)
    except OSError:
        return None


class LiveView:
    """Samples the server's connections and keeps, per tracked export, its live state."""

    #: Totals that only grew are kept at most this often (connections beginning or ending
    #: are kept at once).
    KEEP_EVERY_S = 10.0

    def __init__(
        self,
        main_pid: Callable[[], int],
        *,
        own_probes: Callable[[], Iterable[SocketEnds]] = frozenset,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._main_pid = main_pid
        self._own_probes = own_probes
        self._clock = clock
        self._exports: dict[str, _Export] = {}
        self._views: dict[str, ExportView] = {}
        self._main: int | None = None
        self._main_io: IoCounters | None = None
        self._boot = boot_time()
        #: Bytes moved by connections no sample saw (begun and ended between two).
        self.unattributed = 0
        #: Samples given up because connections ended during every scan of them.
        self.skipped = 0
        #: Bumped (on the loop) when what the links open may have changed: a sample reads
        #: every link again when it differs from the value its last reading began with.
        self._links_changed = 0
        self._links_read: tuple[int, float] = (-1, 0.0)

    # -- what is tracked (event loop) -------------------------------------------------

    def track(self, tracked: Iterable[Tracked], kept: dict[str, Usage]) -> None:
        """Follows exactly these exports; one new to the view starts from what was kept of
        it (when it belongs to the same copy) or from zero."""
        wanted = {t.export_name: t for t in tracked}
        exports = {}
        for name, t in wanted.items():
            state = self._exports.get(name)
            if state is None or state.tracked.prepared_at != t.prepared_at:
                usage = kept.get(name)
                if usage is None or usage.prepared_at != t.prepared_at:
                    usage = Usage(name, t.prepared_at)
                state = _Export(
                    t,
                    usage,
                    shown=(usage.bytes_written, usage.bytes_read),
                    restored={(c[0], c[1]): (c[2], c[3]) for c in usage.open_connections},
                )
            else:
                state.tracked = t
            exports[name] = state
        self._exports = exports
        self._views = {n: v for n, v in self._views.items() if n in exports}
        self._links_changed += 1

    def view(self, name: str) -> ExportView | None:
        return self._views.get(name)

    def views(self) -> dict[str, ExportView]:
        return dict(self._views)

    def tracked(self, name: str) -> Tracked | None:
        state = self._exports.get(name)
        return state.tracked if state else None

    @property
    def main_pid(self) -> int | None:
        """The server process the last sample read (its children are the connections)."""
        return self._main

    def held(self, name: str) -> list[tuple[int, int, DeviceKey]]:
        """The export's open connections as (pid, start ticks, device held), for cutting."""
        state = self._exports.get(name)
        if state is None:
            return []
        return [
            (c.key[0], c.key[1], c.device)
            for c in state.connections.values()
            if c.device is not None
        ]

    def to_keep(self, *, everything: bool = False) -> list[Usage]:
        """The usage to write to export_usage now (and marks it kept)."""
        now = self._clock()
        kept = []
        for state in self._exports.values():
            if (
                everything
                or state.dirty
                or (
                    now - state.kept_at >= self.KEEP_EVERY_S
                    and state.shown != (state.usage.bytes_written, state.usage.bytes_read)
                )
            ):
                tls = state.tracked.tls
                state.usage = replace(
                    state.usage,
                    bytes_written=state.shown[0],
                    bytes_read=state.shown[1],
                    open_connections=tuple(
                        sorted(
                            (*key, *data_counts(c.io, tls)) for key, c in state.connections.items()
                        )
                    ),
                )
                state.dirty = False
                state.kept_at = now
                kept.append(state.usage)
        return kept

    def learn_previous(self, name: str, device_path: str) -> bool:
        """The export opened `device_path` until a relink just now: a connection still on
        it is the export's (shown as on its previous device). False when the export is not
        followed yet."""
        state = self._exports.get(name)
        if state is None:
            return False
        key = path_device_key(device_path)
        if key is not None and key != state.device:
            state.previous.add(key)
        self._links_changed += 1
        return True

    def next_seq(self, name: str) -> int:
        """The export's next event sequence number (for an event the view did not make)."""
        state = self._exports.get(name)
        if state is None:
            return 0
        state.usage = replace(state.usage, event_seq=state.usage.event_seq + 1)
        state.dirty = True
        return state.usage.event_seq

    def not_kept(self, usage: Iterable[Usage]) -> None:
        """What to_keep() returned could not be written: keep it at the next chance."""
        for u in usage:
            state = self._exports.get(u.export_name)
            if state is not None:
                state.dirty = True

    # -- sampling (a worker thread) -------------------------------------------------

    #: Scans of the children a sample tries when connections keep ending during them.
    SCAN_TRIES = 10
    #: How often a sample reads every link when the worker told it of no change.
    LINKS_EVERY_S = 5.0

    def sample(self) -> list[ConnectionEvent]:
        """One sample of the server's children; the connection events it found. Raises
        what main_pid raises (the server is not running: nothing is sampled)."""
        now = self._clock()
        main = self._main_pid()
        if main != self._main:
            # Another server process: its children, and its counters, start afresh (the
            # old ones died with their main process).
            self._main, self._main_io = main, None
        # A stat() of every link is most of a sample's cost with many exports (a thousand:
        # 5 % of a core at one sample a second), and links change only by the worker's
        # own hand, which tells the view (track, learn_previous): read again then, and
        # every LINKS_EVERY_S for a device renamed under a link (a volume attached again).
        # A link that opened nothing is read at every sample: a create tells the view
        # before it writes the link.
        changed = self._links_changed
        every = changed != self._links_read[0] or now - self._links_read[1] >= self.LINKS_EVERY_S
        if every:
            self._links_read = (changed, now)
        for state in list(self._exports.values()):
            if every or state.device is None:
                now_opens = path_device_key(state.tracked.link)
                if now_opens != state.device:
                    if state.device is not None:
                        state.previous.add(state.device)
                    state.device = now_opens
                    state.device_size = _device_size(state.tracked.link) if now_opens else None
        by_device: dict[DeviceKey, _Export] = {}
        for state in list(self._exports.values()):
            if state.device is not None:
                by_device[state.device] = state
            for old in state.previous:
                by_device.setdefault(old, state)
        known = {key: state for state in self._exports.values() for key in state.connections}
        # The main process's counters grow by a child's when it reaps it: read before and
        # after the scan, they must agree, or a connection ended during the scan and its
        # bytes would be counted in one interval and its end in the next (scanned again).
        for _ in range(self.SCAN_TRIES):
            main_io = read_io(main)
            seen, peers = self._scan(main, known, by_device)
            if read_io(main) == main_io:
                break
        else:
            # Connections kept ending during every scan: no sample this time (the next one
            # tries again) rather than one whose ends and counters disagree.
            self.skipped += 1
            return []
        # This process's probes, read once the scan is over: a probe is recorded before its
        # connect() (worker/nbd/wire.py), so one whose child the scan saw is among them; read
        # before the scan, a probe made during it (tens of ms with many connections) would
        # have counted as a client's connection.
        own = set(self._own_probes())
        events: list[ConnectionEvent] = []
        at = datetime.fromtimestamp(now, UTC)
        self._end_vanished(seen, main_io, at, events)
        for key, (state, child) in seen.items():
            conn = state.connections.get(key)
            if conn is None:
                ends = next((peers[s] for s in child.sockets if s in peers), None)
                if ends in own:
                    continue  # the worker's own probe
                client = ends.client if ends is not None else ("", 0)
                device = next((d for d in child.devices if d in by_device), None)
                conn = _Connection(
                    key,
                    client,
                    datetime.fromtimestamp(self._boot + child.start_ticks / CLOCK_TICKS, UTC),
                    current_device=device == state.device,
                    device=device,
                    io=child.io,
                    known=state.restored.pop(key, None) is not None,
                    # First seen: it began since the last sample, so this is what it
                    # moved in the interval (its share of a tail, should it end now).
                    moved=child.io.rchar + child.io.wchar,
                )
                state.connections[key] = conn
                if not conn.known:
                    self._count_connection(state, conn, at, events)
                state.usage = replace(state.usage, last_io_at=at)
                state.dirty = True
                continue
            moved = child.io - conn.io
            conn.moved = moved.rchar + moved.wchar
            if conn.moved:
                state.usage = replace(state.usage, last_io_at=at)
            conn.io = child.io
            conn.current_device = conn.device == state.device
        if main_io is not None:
            self._main_io = main_io
        for state in self._exports.values():
            held = {c.device for c in state.connections.values()}
            state.previous &= held
            self._end_restored(state, seen, at, events)
            self._views[state.tracked.export_name] = self._export_view(state, now, at)
        # Events carry the totals after this sample.
        return [replace(e, export=self._views.get(e.tracked.export_name, e.export)) for e in events]

    def _scan(
        self,
        main: int,
        known: dict[tuple[int, int], _Export],
        by_device: dict[DeviceKey, _Export],
    ) -> tuple[dict[tuple[int, int], tuple[_Export, ChildSample]], dict[int, SocketEnds]]:
        """The server's children that are connections of followed exports, and the
        ends of each socket (read only when a new connection is among them)."""
        seen: dict[tuple[int, int], tuple[_Export, ChildSample]] = {}
        peers: dict[int, SocketEnds] | None = None
        for pid in children(main):
            child = sample_child(pid, main, known)
            if child is None:
                continue
            if child.key in known:
                # A zombie (ended, not yet reaped) too: ended at the next sample, with its
                # last counters.
                seen[child.key] = (known[child.key], child)
                continue
            if child.zombie:
                continue
            serves = next((by_device[d] for d in child.devices if d in by_device), None)
            if serves is None:
                continue  # negotiating, refused, or another server's business
            if child.key not in known and peers is None:
                peers = socket_peers(main)
            seen[child.key] = (serves, child)
        return seen, peers or {}

    def _count_connection(
        self, state: _Export, conn: _Connection, at: datetime, events: list[ConnectionEvent]
    ) -> None:
        usage = state.usage
        state.usage = replace(
            usage,
            connections_total=usage.connections_total + 1,
            event_seq=usage.event_seq + 1,
        )
        events.append(
            ConnectionEvent(
                "connected",
                state.usage.event_seq,
                at,
                state.tracked,
                conn.view(state.tracked.tls),
                self._export_view(state, self._clock(), at),
            )
        )

    def _end_vanished(
        self,
        seen: dict[tuple[int, int], tuple[_Export, ChildSample]],
        main_io: IoCounters | None,
        at: datetime,
        events: list[ConnectionEvent],
    ) -> None:
        """Ends the connections no longer seen, with the bytes they moved since the last
        sample recovered from the main process's counters."""
        ended = [
            (state, conn)
            for state in self._exports.values()
            for conn in state.connections.values()
            if conn.key not in seen
        ]
        tail = IoCounters()
        if main_io is not None and self._main_io is not None:
            grown = main_io - self._main_io
            last = IoCounters()
            for _, conn in ended:
                last = IoCounters(
                    last.rchar + conn.io.rchar,
                    last.wchar + conn.io.wchar,
                    last.write_bytes + conn.io.write_bytes,
                )
            tail = IoCounters(
                max(grown.rchar - last.rchar, 0),
                max(grown.wchar - last.wchar, 0),
                max(grown.write_bytes - last.write_bytes, 0),
            )
            if not ended:
                self.unattributed += tail.write_bytes
        weights = [conn.moved for _, conn in ended]
        total = sum(weights)
        for i, (state, conn) in enumerate(ended):
            share = weights[i] / total if total else 1 / len(ended)
            conn.io = IoCounters(
                conn.io.rchar + round(tail.rchar * share),
                conn.io.wchar + round(tail.wchar * share),
                conn.io.write_bytes + round(tail.write_bytes * share),
            )
            if tail.rchar or tail.write_bytes:
                state.usage = replace(state.usage, last_io_at=at)
            del state.connections[conn.key]
            self._ended(state, conn.view(state.tracked.tls), at, events)

    def _end_restored(
        self,
        state: _Export,
        seen: dict[tuple[int, int], tuple[_Export, ChildSample]],
        at: datetime,
        events: list[ConnectionEvent],
    ) -> None:
        """Connections a previous worker kept as open that ended while no worker ran: ended
        with what they had then (their tail since is not recoverable)."""
        for key, (written, read) in list(state.restored.items()):
            if key in seen:
                continue
            del state.restored[key]
            gone = ConnectionView("", 0, at, state.tracked.tls, True, written, read, key[0])
            self._ended(state, gone, at, events)

    def _ended(
        self, state: _Export, view: ConnectionView, at: datetime, events: list[ConnectionEvent]
    ) -> None:
        """Counts an ended connection into its export's totals, with its event."""
        usage = state.usage
        state.usage = replace(
            usage,
            ended_written=usage.ended_written + view.bytes_written,
            ended_read=usage.ended_read + view.bytes_read,
            event_seq=usage.event_seq + 1,
        )
        state.dirty = True
        events.append(
            ConnectionEvent(
                "disconnected",
                state.usage.event_seq,
                at,
                state.tracked,
                view,
                self._export_view(state, self._clock(), at),
            )
        )

    def _export_view(self, state: _Export, now: float, at: datetime) -> ExportView:
        tls = state.tracked.tls
        conns = tuple(c.view(tls) for c in state.connections.values())
        written = state.usage.ended_written + sum(c.bytes_written for c in conns)
        read = state.usage.ended_read + sum(c.bytes_read for c in conns)
        state.shown = (max(state.shown[0], written), max(state.shown[1], read))
        last_io = state.usage.last_io_at
        # Idle since its last I/O, or since it was prepared if it never had any.
        since = last_io or state.tracked.prepared_at
        return ExportView(
            export_name=state.tracked.export_name,
            connections=tuple(sorted(conns, key=lambda c: (c.connected_at, c.pid))),
            connections_total=state.usage.connections_total,
            bytes_written=state.shown[0],
            bytes_read=state.shown[1],
            last_io_at=last_io,
            idle_seconds=max(0.0, now - since.timestamp()),
            device_size=state.device_size,
            planned_bytes=state.tracked.planned_bytes,
            sampled_at=at,
        )
