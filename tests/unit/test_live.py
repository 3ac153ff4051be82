"""The live view's accounting (worker/live.py) on a fake /proc: the readers worker.live
imports are replaced by a FakeProc whose children, counters, sockets and links each test
sets, and the clock is a fake one. What the kernel does is played by FakeProc: a reaped
child's whole counters are added to the main process's.

Over 400 lines (budget 680) as one algorithm's tests (worker/live.py's sample), with the fake
/proc they share."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

import worker.live as live
from worker.errors import ServerUnavailable
from worker.live import (
    ConnectionView,
    ExportView,
    LiveView,
    Tracked,
    Usage,
    data_counts,
)
from worker.live_sampler import export_event
from worker.nbd.connections import CLOCK_TICKS, ChildSample, DeviceKey, IoCounters, SocketEnds

BOOT = 1_700_000_000.0
T0 = 1_800_000_000.0
PREPARED = datetime.fromtimestamp(T0 - 100, UTC)
MAIN = 100
#: The server's end of every connection (its listening address and port).
SERVER = ("127.0.0.1", 10_809)
DEV1: DeviceKey = ("b", os.makedev(7, 1))
DEV2: DeviceKey = ("b", os.makedev(7, 2))
OTHER: DeviceKey = ("f", 2049, 1234)


def at(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeProc:
    """/proc as worker.live reads it: one main process, its children, its sockets."""

    main: int = MAIN
    main_io: IoCounters = field(default_factory=lambda: IoCounters(50_000, 40_000, 30_000))
    kids: dict[int, ChildSample] = field(default_factory=dict)
    peers: dict[int, SocketEnds] = field(default_factory=dict)
    links: dict[Path, DeviceKey | None] = field(default_factory=dict)
    peer_reads: int = 0

    # -- what worker.live calls
    def children(self, main: int) -> list[int]:
        return sorted(self.kids) if main == self.main else []

    def sample_child(
        self, pid: int, main: int, known: Iterable[tuple[int, int]] = ()
    ) -> ChildSample | None:
        child = self.kids.get(pid)
        if child is None or main != self.main:
            return None
        if child.zombie or child.key in set(known):
            return replace(child, devices=frozenset(), sockets=frozenset())
        return child

    def socket_peers(self, main: int) -> dict[int, SocketEnds]:
        self.peer_reads += 1
        return dict(self.peers) if main == self.main else {}

    def read_io(self, pid: int) -> IoCounters | None:
        return self.main_io if pid == self.main else None

    def path_device_key(self, path: str | Path) -> DeviceKey | None:
        return self.links.get(Path(path))

    # -- what the tests do
    def connect(
        self, pid: int, device: DeviceKey | None, port: int = 0, io: IoCounters | None = None,
        server: tuple[str, int] = SERVER,
    ) -> None:  # fmt: skip
        """A new child of the main process, holding `device` (None: still negotiating), for
        a client from port `port` of 10.0.0.7 to `server`."""
        self.kids[pid] = ChildSample(
            pid, pid * 10, frozenset({device} if device else ()), frozenset({pid + 9000}),
            io or IoCounters(),
        )  # fmt: skip
        self.peers[pid + 9000] = SocketEnds(("10.0.0.7", port or 40_000 + pid), server)

    def io(self, pid: int, rchar: int, wchar: int, write_bytes: int) -> None:
        self.kids[pid] = replace(self.kids[pid], io=IoCounters(rchar, wchar, write_bytes))

    def exit(self, pid: int) -> None:
        """The child ends: a zombie until reaped."""
        self.kids[pid] = replace(self.kids[pid], zombie=True)

    def reap(self, pid: int) -> None:
        child = self.kids.pop(pid)
        m, c = self.main_io, child.io
        self.main_io = IoCounters(
            m.rchar + c.rchar, m.wchar + c.wchar, m.write_bytes + c.write_bytes
        )


@pytest.fixture
def proc(monkeypatch: pytest.MonkeyPatch) -> FakeProc:
    fake = FakeProc()
    for name in ("children", "sample_child", "socket_peers", "read_io", "path_device_key"):
        monkeypatch.setattr(live, name, getattr(fake, name))
    monkeypatch.setattr(live, "boot_time", lambda: BOOT)
    return fake


@pytest.fixture
def clock() -> Clock:
    return Clock()


def export(
    proc: FakeProc, tmp_path: Path, name: str, device: DeviceKey, *, size: int = 4096,
    tls: bool = False, prepared_at: datetime = PREPARED, planned_bytes: int | None = None,
) -> Tracked:  # fmt: skip
    """A tracked export whose link (a real file, for its size) opens `device`."""
    link = tmp_path / name
    link.write_bytes(b"\0" * size)
    proc.links[link] = device
    return Tracked(name, f"vm-{name}", 0, link, tls, prepared_at, planned_bytes)


def view_of(proc: FakeProc, clock: Clock, own_probes: Iterable[SocketEnds] = ()) -> LiveView:
    return LiveView(lambda: proc.main, own_probes=lambda: own_probes, clock=clock)


def shown(view: LiveView, name: str) -> ExportView:
    found = view.view(name)
    assert found is not None
    return found


def test_a_new_connection_is_connected_with_seq_1_and_counted(
    proc: FakeProc, clock: Clock, tmp_path: Path
) -> None:
    view = view_of(proc, clock)
    view.track([export(proc, tmp_path, "e1", DEV1)], {})
    assert view.sample() == []
    first = shown(view, "e1")
    assert (first.connections, first.connections_total, first.bytes_written) == ((), 0, 0)
    assert first.device_size == 4096

    proc.connect(201, DEV1, port=40_001)
    clock.now += 1
    (event,) = view.sample()
    assert (event.kind, event.seq, event.at) == ("connected", 1, at(clock.now))
    assert event.connection == ConnectionView(
        client_address="10.0.0.7", client_port=40_001,
        connected_at=at(BOOT + 2010 / CLOCK_TICKS), tls=False, current_device=True,
        bytes_written=0, bytes_read=0, pid=201,
    )  # fmt: skip
    assert event.export.connections_total == 1
    assert event.export.connections == (event.connection,)
    message = export_event(event, "node-a")
    assert (message.kind, message.seq, message.connections, message.connections_total) == (
        "connected", 1, 1, 1,
    )  # fmt: skip
    assert view.sample() == []  # seen again: nothing new
    assert shown(view, "e1").connections_total == 1


@pytest.mark.parametrize(
    ("io", "tls", "counts"),
    [
        (IoCounters(rchar=4_124, wchar=4_096, write_bytes=4_096), False, (4_096, 28)),
        (IoCounters(rchar=4_124, wchar=4_096, write_bytes=4_096), True, (4_096, 4_124)),
        (IoCounters(rchar=1_000_000, wchar=1_000_000, write_bytes=0), False, (0, 1_000_000)),
        # Never below zero (write_bytes counts page cache the socket's reads did not bring).
        (IoCounters(rchar=100, wchar=4_096, write_bytes=8_192), False, (4_096, 0)),
        # Folios dirtied again after writeback count again in write_bytes, not in wchar
        # (measured: 134,217,728 bytes copied, write_bytes 140,566,528, wchar 134,226,926).
        (
            IoCounters(rchar=134_232_570, wchar=134_226_926, write_bytes=140_566_528),
            False,
            (134_226_926, 5_644),
        ),
        (IoCounters(rchar=0, wchar=134_217_728, write_bytes=140_566_528), True, (134_217_728, 0)),
    ],
    ids=[
        "plain-write",
        "tls-write",
        "plain-read",
        "plain-never-negative",
        "plain-folios-recounted",
        "tls-folios-recounted",
    ],
)
def test_data_counts(io: IoCounters, tls: bool, counts: tuple[int, int]) -> None:
    assert data_counts(io, tls) == counts


@pytest.mark.parametrize(("tls", "reads"), [(False, (28, 112)), (True, (4_124, 16_496))])
def test_growing_counters_grow_bytes_written_and_read(
    proc: FakeProc, clock: Clock, tmp_path: Path, tls: bool, reads: tuple[int, int]
) -> None:
    view = view_of(proc, clock)
    view.track([export(proc, tmp_path, "e1", DEV1, tls=tls)], {})
    proc.connect(201, DEV1, io=IoCounters(4_124, 4_096, 4_096))
    (event,) = view.sample()
    assert event.connection.tls is tls
    assert (shown(view, "e1").bytes_written, shown(view, "e1").bytes_read) == (4_096, reads[0])
    proc.io(201, 16_496, 16_384, 16_384)
    assert view.sample() == []
    now = shown(view, "e1")
    assert (now.bytes_written, now.bytes_read) == (16_384, reads[1])
    assert (now.connections[0].bytes_written, now.connections[0].bytes_read) == (16_384, reads[1])


def test_a_vanished_connection_is_disconnected_with_its_tail_from_the_main_process(
    proc: FakeProc, clock: Clock, tmp_path: Path
) -> None:
    view = view_of(proc, clock)
    view.track([export(proc, tmp_path, "e1", DEV1)], {})
    proc.connect(201, DEV1, io=IoCounters(128, 100, 100))
    view.sample()
    proc.io(201, 190, 150, 150)  # after the last sample: 50 more...
    proc.reap(201)  # ...and the main process's counters grow by all 150
    clock.now += 1
    (event,) = view.sample()
    assert (event.kind, event.seq) == ("disconnected", 2)
    assert (event.connection.bytes_written, event.connection.bytes_read) == (150, 40)
    assert (event.export.connections, event.export.bytes_written) == ((), 150)
    assert (shown(view, "e1").bytes_written, shown(view, "e1").bytes_read) == (150, 40)
    assert shown(view, "e1").connections_total == 1
    assert view.unattributed == 0


def test_two_exports_ending_together_split_the_tail_by_what_each_moved_before(
    proc: FakeProc, clock: Clock, tmp_path: Path
) -> None:
    view = view_of(proc, clock)
    view.track([export(proc, tmp_path, "a", DEV1), export(proc, tmp_path, "b", DEV2)], {})
    view.sample()
    proc.connect(201, DEV1)
    proc.connect(202, DEV2)
    assert len(view.sample()) == 2
    proc.io(201, 3_000, 3_000, 3_000)  # moved 6,000 in this interval
    proc.io(202, 1_000, 1_000, 1_000)  # moved 2,000
    assert view.sample() == []
    # Both end before the next sample: 4,000 more written between them (3,500 and 500,
    # which nothing outside can tell apart), shared 3:1.
    proc.io(201, 6_500, 6_500, 6_500)
    proc.io(202, 1_500, 1_500, 1_500)
    proc.reap(201)
    proc.reap(202)
    events = view.sample()
    assert sorted((e.tracked.export_name, e.kind, e.seq) for e in events) == [
        ("a", "disconnected", 2), ("b", "disconnected", 2),
    ]  # fmt: skip
    assert shown(view, "a").bytes_written == 6_000
    assert shown(view, "b").bytes_written == 2_000
    assert shown(view, "a").bytes_written + shown(view, "b").bytes_written == 8_000  # exact
    assert view.unattributed == 0


def test_connections_of_one_export_ending_together_are_exact(
    proc: FakeProc, clock: Clock, tmp_path: Path
) -> None:
    view = view_of(proc, clock)
    view.track([export(proc, tmp_path, "a", DEV1)], {})
    view.sample()
    for pid in (201, 202, 203, 204):
        proc.connect(pid, DEV1)
    assert len(view.sample()) == 4
    for pid in (201, 202, 203, 204):
        proc.io(pid, 1_000 * pid, 1_000 * pid, 1_000 * pid)
    view.sample()
    for pid in (201, 202, 203, 204):
        proc.io(pid, 3_000 * pid, 3_000 * pid, 3_000 * pid)
        proc.reap(pid)
    events = view.sample()
    assert [e.seq for e in events] == [5, 6, 7, 8]
    assert shown(view, "a").bytes_written == 3_000 * (201 + 202 + 203 + 204)
    assert events[-1].export.bytes_written == shown(view, "a").bytes_written


def test_a_known_zombie_is_kept_until_reaped_and_an_unseen_one_is_unattributed(
    proc: FakeProc, clock: Clock, tmp_path: Path
) -> None:
    view = view_of(proc, clock)
    view.track([export(proc, tmp_path, "e1", DEV1)], {})
    proc.connect(201, DEV1)
    view.sample()
    proc.io(201, 528, 500, 500)
    proc.exit(201)  # its descriptors are closed; its counters readable
    assert view.sample() == []
    assert view.sample() == []
    assert len(shown(view, "e1").connections) == 1
    assert shown(view, "e1").bytes_written == 500
    proc.reap(201)
    (event,) = view.sample()
    assert (event.kind, event.connection.bytes_written) == ("disconnected", 500)
    assert shown(view, "e1").bytes_written == 500

    # A connection no sample saw open (already a zombie at the first look at it).
    proc.connect(202, DEV1, io=IoCounters(700, 700, 700))
    proc.exit(202)
    assert view.sample() == []
    proc.reap(202)
    assert view.sample() == []
    assert (shown(view, "e1").connections_total, shown(view, "e1").bytes_written) == (1, 500)
    assert view.unattributed == 700


def kept(**fields: object) -> Usage:
    defaults: dict[str, object] = {
        "connections_total": 3, "bytes_written": 1_000, "bytes_read": 80,
        "ended_written": 600, "ended_read": 50, "event_seq": 5,
        "open_connections": ((201, 2010, 400, 30),),
    }  # fmt: skip
    return Usage("e1", PREPARED, **{**defaults, **fields})  # type: ignore[arg-type]


def test_totals_never_go_back_below_what_was_kept(
    proc: FakeProc, clock: Clock, tmp_path: Path
) -> None:
    view = view_of(proc, clock)
    view.track([export(proc, tmp_path, "e1", DEV1)], {"e1": kept()})
    proc.connect(201, DEV1, io=IoCounters(300, 300, 300))  # 600 + 300 < 1,000
    assert view.sample() == []
    assert (shown(view, "e1").bytes_written, shown(view, "e1").bytes_read) == (1_000, 80)
    proc.io(201, 450, 450, 450)
    view.sample()
    assert shown(view, "e1").bytes_written == 1_050


def test_kept_open_connections_are_neither_counted_again_nor_evented(
    proc: FakeProc, clock: Clock, tmp_path: Path
) -> None:
    view = view_of(proc, clock)
    view.track([export(proc, tmp_path, "e1", DEV1)], {"e1": kept()})
    proc.connect(201, DEV1, io=IoCounters(400, 400, 400))
    assert view.sample() == []
    assert shown(view, "e1").connections_total == 3
    assert [c.pid for c in shown(view, "e1").connections] == [201]  # shown all the same
    proc.connect(202, DEV1)
    (event,) = view.sample()
    assert (event.kind, event.seq, event.export.connections_total) == ("connected", 6, 4)
    proc.reap(201)
    (event,) = view.sample()
    assert (event.kind, event.seq, event.connection.pid) == ("disconnected", 7, 201)
    assert shown(view, "e1").bytes_written == 1_000  # 600 ended before, 400 now


def test_a_connection_that_ended_while_no_worker_ran_loses_only_its_tail(
    proc: FakeProc, clock: Clock, tmp_path: Path
) -> None:
    """docs/architecture.md: "A connection that ended while no worker ran loses its tail
    since the last keep." Its 400 bytes counted at the keep stay counted, and a new
    connection's bytes add to them."""
    view = view_of(proc, clock)
    view.track([export(proc, tmp_path, "e1", DEV1)], {"e1": kept()})  # 201 is gone
    (gone,) = view.sample()  # ended, with what it had at the keep
    assert (gone.kind, gone.seq, gone.connection.bytes_written) == ("disconnected", 6, 400)
    assert shown(view, "e1").bytes_written == 1_000
    proc.connect(202, DEV1, io=IoCounters(300, 300, 300))
    view.sample()
    assert shown(view, "e1").bytes_written == 1_300


def test_track_with_a_new_prepared_at_starts_from_zero(
    proc: FakeProc, clock: Clock, tmp_path: Path
) -> None:
    view = view_of(proc, clock)
    first = export(proc, tmp_path, "e1", DEV1)
    view.track([first], {})
    proc.connect(201, DEV1, io=IoCounters(1_000, 1_000, 1_000))
    view.sample()
    proc.reap(201)
    view.sample()
    assert (shown(view, "e1").bytes_written, shown(view, "e1").connections_total) == (1_000, 1)
    view.track([first], {})  # the same copy: kept as it was
    assert shown(view, "e1").bytes_written == 1_000

    again = replace(first, prepared_at=at(T0))  # a new create of the same export
    old = Usage("e1", PREPARED, connections_total=1, bytes_written=1_000, event_seq=2)
    view.track([again], {"e1": old})  # what was kept belongs to the old copy
    view.sample()
    assert (shown(view, "e1").bytes_written, shown(view, "e1").connections_total) == (0, 0)
    proc.connect(202, DEV1, io=IoCounters(10, 10, 10))
    (event,) = view.sample()
    assert (event.seq, event.export.connections_total, event.export.bytes_written) == (1, 1, 10)

    view.track([], {})  # no longer active: no view left
    assert view.view("e1") is None
    assert view.tracked("e1") is None


def test_children_holding_no_tracked_device_are_not_connections(
    proc: FakeProc, clock: Clock, tmp_path: Path
) -> None:
    view = view_of(proc, clock)
    view.track([export(proc, tmp_path, "e1", DEV1)], {})
    proc.connect(201, None)  # negotiating, or refused by the authfile
    proc.connect(202, OTHER)  # an export this view does not follow
    assert view.sample() == []
    assert shown(view, "e1").connections == ()
    assert proc.peer_reads == 0  # no socket table read for them
    proc.kids[201] = replace(proc.kids[201], devices=frozenset({DEV1}))  # committed to e1
    (event,) = view.sample()
    assert (event.kind, event.connection.pid) == ("connected", 201)


def test_the_socket_table_is_read_once_a_sample_and_only_for_new_children(
    proc: FakeProc, clock: Clock, tmp_path: Path
) -> None:
    view = view_of(proc, clock)
    view.track([export(proc, tmp_path, "e1", DEV1)], {})
    proc.connect(201, DEV1)
    proc.connect(202, DEV1)
    assert len(view.sample()) == 2
    assert proc.peer_reads == 1
    view.sample()
    assert proc.peer_reads == 1


def test_the_workers_own_probes_are_not_connections(
    proc: FakeProc, clock: Clock, tmp_path: Path
) -> None:
    # A probe is known by both ends of the child's socket: the same port from another
    # address is a client, and so is a client on the port a probe to another server used.
    view = view_of(
        proc,
        clock,
        own_probes={
            SocketEnds(("10.0.0.7", 40_001), SERVER),
            SocketEnds(("127.0.0.9", 40_002), SERVER),
            SocketEnds(("10.0.0.7", 40_003), ("127.0.0.1", 10_810)),
        },
    )
    view.track([export(proc, tmp_path, "e1", DEV1)], {})
    proc.connect(201, DEV1, port=40_001)
    proc.connect(202, DEV1, port=40_002)
    proc.connect(203, DEV1, port=40_003)
    events = view.sample()
    assert [e.connection.client_port for e in events] == [40_002, 40_003]
    assert [c.pid for c in shown(view, "e1").connections] == [202, 203]
    assert shown(view, "e1").connections_total == 2


def test_a_probe_made_while_a_sample_scans_is_not_a_connection(
    proc: FakeProc, clock: Clock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scan takes tens of milliseconds with many connections: a probe that connects
    meanwhile (recorded before its connect(), so before its child can be seen) is left out
    too, not only those recorded when the sample began."""
    probes: set[SocketEnds] = set()
    view = LiveView(lambda: proc.main, own_probes=lambda: probes, clock=clock)
    view.track([export(proc, tmp_path, "e1", DEV1)], {})
    proc.connect(201, DEV1, port=40_001)
    scan = proc.socket_peers

    def the_probe_connected_as_the_scan_began(main: int) -> dict[int, SocketEnds]:
        probes.add(SocketEnds(("10.0.0.7", 40_001), SERVER))
        return scan(main)

    monkeypatch.setattr(live, "socket_peers", the_probe_connected_as_the_scan_began)
    assert view.sample() == []
    assert shown(view, "e1").connections == ()
    assert shown(view, "e1").connections_total == 0


def test_a_relinked_export_keeps_its_old_connections_on_the_previous_device(
    proc: FakeProc, clock: Clock, tmp_path: Path
) -> None:
    view = view_of(proc, clock)
    tracked = export(proc, tmp_path, "e1", DEV1)
    view.track([tracked], {})
    proc.connect(201, DEV1)
    view.sample()
    proc.links[tracked.link] = DEV2  # relinked...
    tracked.link.write_bytes(b"\0" * 8192)
    proc.links[tmp_path / "old-device"] = DEV1
    assert view.learn_previous("e1", str(tmp_path / "old-device"))  # ...and the view told
    proc.connect(202, DEV2)
    (event,) = view.sample()
    assert (event.connection.pid, event.connection.current_device) == (202, True)
    now = shown(view, "e1")
    assert {c.pid: c.current_device for c in now.connections} == {201: False, 202: True}
    assert now.device_size == 8192
    proc.reap(201)
    (event,) = view.sample()
    assert (event.kind, event.connection.pid, event.connection.current_device) == (
        "disconnected", 201, False,
    )  # fmt: skip
    proc.connect(203, DEV1)  # the previous device, no longer the export's
    assert view.sample() == []
    assert [c.pid for c in shown(view, "e1").connections] == [202]


def test_links_are_read_again_when_the_view_is_told_or_every_few_seconds(
    proc: FakeProc, clock: Clock, tmp_path: Path
) -> None:
    """A stat() of every link each sample is most of its cost with many exports: a link is
    read when the view is told of a change (track, learn_previous), else every
    LINKS_EVERY_S, when a device renamed under the link is found."""
    view = view_of(proc, clock)
    tracked = export(proc, tmp_path, "e1", DEV1)
    view.track([tracked], {})
    view.sample()
    proc.links[tracked.link] = DEV2  # changed behind the worker's back
    proc.connect(202, DEV2)
    assert view.sample() == []  # not read again yet: 202 is nobody's
    clock.now += LiveView.LINKS_EVERY_S
    (event,) = view.sample()
    assert (event.kind, event.connection.pid, event.connection.current_device) == (
        "connected", 202, True,
    )  # fmt: skip
    proc.links[tracked.link] = DEV1
    view.track([tracked], {})  # told: read at the next sample
    proc.connect(203, DEV1)
    (event,) = view.sample()
    assert (event.connection.pid, event.connection.current_device) == (203, True)


def test_a_link_not_written_yet_is_read_at_every_sample(
    proc: FakeProc, clock: Clock, tmp_path: Path
) -> None:
    """A create tells the view before it writes the export's link: a link that opened
    nothing is read again at every sample, and the copy that follows at once is seen."""
    view = view_of(proc, clock)
    tracked = export(proc, tmp_path, "e1", DEV1)
    proc.links[tracked.link] = None  # claimed, link not written yet
    view.track([tracked], {})
    assert view.sample() == []
    proc.links[tracked.link] = DEV1  # written
    proc.connect(201, DEV1)
    (event,) = view.sample()
    assert (event.kind, event.connection.pid) == ("connected", 201)


def test_idle_seconds_grow_with_the_clock_and_reset_on_io(
    proc: FakeProc, clock: Clock, tmp_path: Path
) -> None:
    view = view_of(proc, clock)
    view.track([export(proc, tmp_path, "e1", DEV1)], {})
    view.sample()
    assert shown(view, "e1").idle_seconds == 100  # since it was prepared
    assert shown(view, "e1").last_io_at is None
    clock.now = T0 + 10
    proc.connect(201, DEV1)
    view.sample()
    assert (shown(view, "e1").idle_seconds, shown(view, "e1").last_io_at) == (0, at(T0 + 10))
    clock.now = T0 + 13
    view.sample()
    assert shown(view, "e1").idle_seconds == 3
    clock.now = T0 + 15
    proc.io(201, 4_124, 4_096, 4_096)
    view.sample()
    assert (shown(view, "e1").idle_seconds, shown(view, "e1").last_io_at) == (0, at(T0 + 15))
    clock.now = T0 + 20.5
    view.sample()
    assert shown(view, "e1").idle_seconds == 5.5


@pytest.mark.parametrize(
    ("planned", "written", "progress"),
    [(None, 500, None), (0, 500, None), (1_000, 0, 0.0), (1_000, 500, 0.5), (1_000, 1_000, 1.0),
     (1_000, 2_000, 1.0)],
)  # fmt: skip
def test_progress(planned: int | None, written: int, progress: float | None) -> None:
    found = ExportView("e1", (), 0, written, 0, None, 0.0, None, planned, at(T0))
    assert found.progress == progress


def test_progress_follows_the_copy_and_stops_at_one(
    proc: FakeProc, clock: Clock, tmp_path: Path
) -> None:
    view = view_of(proc, clock)
    view.track([export(proc, tmp_path, "e1", DEV1, planned_bytes=1_000)], {})
    proc.connect(201, DEV1, io=IoCounters(500, 500, 500))
    view.sample()
    assert shown(view, "e1").progress == 0.5
    proc.io(201, 1_200, 1_200, 1_200)  # metadata: more than the plan
    view.sample()
    assert shown(view, "e1").progress == 1.0


def test_to_keep_returns_what_changed_and_growth_every_keep_interval(
    proc: FakeProc, clock: Clock, tmp_path: Path
) -> None:
    view = view_of(proc, clock)
    view.track([export(proc, tmp_path, "e1", DEV1), export(proc, tmp_path, "e2", DEV2)], {})
    view.sample()
    assert view.to_keep() == []  # nothing happened
    proc.connect(201, DEV1, io=IoCounters(100, 100, 100))
    view.sample()
    (usage,) = view.to_keep()  # a connection began: kept at once
    assert (usage.export_name, usage.connections_total, usage.event_seq) == ("e1", 1, 1)
    assert (usage.bytes_written, usage.open_connections) == (100, ((201, 2010, 100, 0),))
    assert view.to_keep() == []
    proc.io(201, 600, 600, 600)
    clock.now += LiveView.KEEP_EVERY_S / 2
    view.sample()
    assert view.to_keep() == []  # only grew: not yet
    clock.now += LiveView.KEEP_EVERY_S / 2
    view.sample()
    (usage,) = view.to_keep()
    assert usage.bytes_written == 600
    assert view.to_keep() == []
    assert [u.export_name for u in view.to_keep(everything=True)] == ["e1", "e2"]
    proc.reap(201)
    view.sample()
    (usage,) = view.to_keep()  # ended: kept at once
    assert (usage.ended_written, usage.open_connections, usage.event_seq) == (600, (), 2)


def test_another_main_process_ends_the_old_connections_without_a_tail(
    proc: FakeProc, clock: Clock, tmp_path: Path
) -> None:
    view = view_of(proc, clock)
    view.track([export(proc, tmp_path, "e1", DEV1)], {})
    proc.connect(201, DEV1, io=IoCounters(100, 100, 100))
    view.sample()
    proc.main, proc.kids, proc.main_io = 300, {}, IoCounters(9_999, 9_999, 9_999)
    (event,) = view.sample()
    assert (event.kind, event.connection.bytes_written) == ("disconnected", 100)
    assert view.unattributed == 0


def test_sample_raises_what_main_pid_raises(proc: FakeProc, clock: Clock) -> None:
    def gone() -> int:
        raise ServerUnavailable("nbd-server is not running")

    with pytest.raises(ServerUnavailable):
        LiveView(gone, clock=clock).sample()


def test_a_sample_whose_every_scan_a_connection_end_crossed_is_given_up(
    proc: FakeProc, clock: Clock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The main process's counters differ before and after every scan (connections keep
    being reaped): no sample rather than one whose ends and counters disagree (an end
    counted in one interval and its bytes in the next, on another connection)."""
    view = view_of(proc, clock)
    view.track([export(proc, tmp_path, "e1", DEV1)], {})
    proc.connect(201, DEV1, io=IoCounters(100, 100, 100))
    (connected,) = view.sample()
    assert connected.kind == "connected"
    reaps = iter(range(10_000))
    monkeypatch.setattr(live, "read_io", lambda pid: IoCounters(next(reaps), 0, 0))
    proc.reap(201)
    assert view.sample() == []
    assert view.skipped == 1
    assert [c.pid for c in shown(view, "e1").connections] == [201]  # nothing decided yet
