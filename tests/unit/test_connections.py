"""nbd-server's connections read from /proc (worker/nbd/connections.py): the parsers as
tables of lines shaped as the kernel writes them, then the readers on real processes and
sockets of this test (a child it starts, connections it opens)."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.nbd.connections import (
    IoCounters,
    SocketEnds,
    boot_time,
    children,
    device_key,
    parse_io,
    parse_tcp_table,
    path_device_key,
    read_io,
    sample_child,
    socket_peers,
)

TCP_HEADER = (
    "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  "
    "timeout inode"
)
TCP6_HEADER = (
    "  sl  local_address                         remote_address                        st "
    "tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode"
)


def tcp_line(local: str, remote: str, inode: int, state: str = "01") -> str:
    return (
        f"   0: {local} {remote} {state} 00000000:00000000 00:00000000 00000000  1000        0 "
        f"{inode} 1 0000000000000000 20 4 30 10 -1"
    )


#: The server's end in the tables below: 127.0.0.1:11111, or [::1]:11111.
V4, V6 = ("127.0.0.1", 0x2B67), ("::1", 0x2B67)

# (what, the table's text, socket inode -> (client's end, server's end))
TCP_TABLES: list[tuple[str, str, dict[int, SocketEnds]]] = [
    ("IPv4: 127.0.0.1:41234 (each word in host order, little-endian here)",
     TCP_HEADER + "\n" + tcp_line("0100007F:2B67", "0100007F:A112", 81234),
     {81234: SocketEnds(("127.0.0.1", 0xA112), V4)}),
    ("IPv4: another host, another port",
     TCP_HEADER + "\n" + tcp_line("0100007F:2B67", "0700000A:C350", 7),
     {7: SocketEnds(("10.0.0.7", 50000), V4)}),
    ("IPv6: ::1",
     TCP6_HEADER + "\n" + tcp_line(
         "00000000000000000000000001000000:2B67", "00000000000000000000000001000000:D431", 99),
     {99: SocketEnds(("::1", 0xD431), V6)}),
    ("IPv4-mapped IPv6 (a dual-stack listener): shown as the IPv4 address",
     TCP6_HEADER + "\n" + tcp_line(
         "0000000000000000FFFF00000100007F:2B67", "0000000000000000FFFF00000200007F:9C40", 5),
     {5: SocketEnds(("127.0.0.2", 40000), V4)}),
    ("IPv6: a global address",
     TCP6_HEADER + "\n" + tcp_line(
         "00000000000000000000000001000000:2B67", "B80D0120000000000000000001000000:0050", 6),
     {6: SocketEnds(("2001:db8::1", 80), V6)}),
    ("inode 0 (TIME_WAIT: no socket any more) is skipped; the others are kept",
     TCP_HEADER + "\n" + tcp_line("0100007F:2B67", "0100007F:A112", 0, state="06") + "\n"
     + tcp_line("0100007F:2B67", "0100007F:A113", 42),
     {42: SocketEnds(("127.0.0.1", 0xA113), V4)}),
    ("only the header", TCP_HEADER, {}),
    ("nothing", "", {}),
    ("a short line is skipped",
     TCP_HEADER + "\n   0: 0100007F:2B67 0100007F:A112 01\n" + tcp_line(
         "0100007F:2B67", "0100007F:A112", 3), {3: SocketEnds(("127.0.0.1", 0xA112), V4)}),
]  # fmt: skip


@pytest.mark.parametrize(("what", "text", "peers"), TCP_TABLES, ids=[t[0] for t in TCP_TABLES])
def test_parse_tcp_table(what: str, text: str, peers: dict[int, SocketEnds]) -> None:
    assert parse_tcp_table(text) == peers


PROC_IO = """rchar: 323934931
wchar: 323929600
syscr: 632687
syscw: 632675
read_bytes: 4096
write_bytes: 323932160
cancelled_write_bytes: 0
"""

IO_TABLE: list[tuple[str, str, IoCounters]] = [
    ("as the kernel writes it: read_bytes is not used",
     PROC_IO, IoCounters(rchar=323934931, wchar=323929600, write_bytes=323932160)),
    ("a field missing counts 0", "rchar: 12\nwchar: 3\n", IoCounters(12, 3, 0)),
    ("nothing", "", IoCounters()),
    ("lines without ': ' are skipped", "garbage\nwrite_bytes: 4096\n\n", IoCounters(0, 0, 4096)),
]  # fmt: skip


@pytest.mark.parametrize(("what", "text", "io"), IO_TABLE, ids=[t[0] for t in IO_TABLE])
def test_parse_io(what: str, text: str, io: IoCounters) -> None:
    assert parse_io(text) == io


def test_io_counters_subtract_field_by_field() -> None:
    assert IoCounters(10, 20, 30) - IoCounters(1, 2, 3) == IoCounters(9, 18, 27)


def fake_stat(mode: int, *, dev: int = 0, ino: int = 0, rdev: int = 0) -> os.stat_result:
    return os.stat_result((mode, ino, dev, 1, 0, 0, 0, 0, 0, 0), {"st_rdev": rdev})


def test_device_key_names_a_block_device_by_its_rdev_and_a_file_by_device_and_inode(
    tmp_path: Path,
) -> None:
    disk = tmp_path / "disk"
    disk.write_bytes(b"x" * 4096)
    st = os.stat(disk)
    assert device_key(st) == ("f", st.st_dev, st.st_ino)
    loop3 = os.makedev(7, 3)
    # One block device, whatever the device and inode of the node that names it.
    assert device_key(fake_stat(stat.S_IFBLK | 0o660, dev=5, ino=11, rdev=loop3)) == ("b", loop3)
    assert device_key(fake_stat(stat.S_IFBLK | 0o660, dev=6, ino=99, rdev=loop3)) == ("b", loop3)
    assert device_key(fake_stat(stat.S_IFCHR | 0o666, rdev=os.makedev(1, 3))) is None
    assert device_key(os.stat(tmp_path)) is None  # a directory
    assert device_key(os.stat("/dev/null")) is None


def test_path_device_key_follows_links_and_is_none_for_a_dangling_one(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.write_bytes(b"x")
    link = tmp_path / "link"
    link.symlink_to(disk)
    assert path_device_key(link) == path_device_key(disk) == device_key(os.stat(disk))
    disk.unlink()
    assert path_device_key(link) is None
    assert path_device_key(tmp_path / "never") is None


# --- on real processes and sockets --------------------------------------------------------


@pytest.fixture
def child(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """A child of this process holding a file open (as a connection's child holds its
    export's device), and a socket; killed and reaped at the end."""
    held = tmp_path / "held-disk"
    held.write_bytes(b"d" * 8192)
    code = (
        "import socket, sys, time\n"
        f"f = open({str(held)!r}, 'rb'); f.read()\n"
        "s = socket.socket()\n"
        "print('ready', flush=True)\n"
        "time.sleep(30)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "ready\n"
        yield process, held
    finally:
        process.kill()
        process.wait(10)
        if process.stdout is not None:
            process.stdout.close()


def wait_state(pid: int, state: str) -> None:
    for _ in range(500):
        text = Path(f"/proc/{pid}/stat").read_text()
        if text[text.rindex(")") + 2] == state:
            return
        time.sleep(0.01)
    raise AssertionError(f"{pid} never in state {state}")


def test_sample_child_sees_the_device_a_child_holds_and_its_counters(
    child: tuple[subprocess.Popen[str], Path],
) -> None:
    process, held = child
    assert process.pid in children(os.getpid())
    sample = sample_child(process.pid, os.getpid())
    assert sample is not None
    assert sample.pid == process.pid
    assert device_key(os.stat(held)) in sample.devices
    assert len(sample.sockets) == 1  # the socket it made (stdout is a pipe, not a socket)
    assert not sample.zombie
    assert sample.io.rchar >= 8192  # it read the file
    assert sample.io == read_io(process.pid)
    # Its start, as the kernel counts it (ticks after boot), is a moment of this run.
    started = boot_time() + sample.start_ticks / os.sysconf("SC_CLK_TCK")
    assert time.time() - 60 < started <= time.time() + 1

    # A known child: only its counters (its descriptors were read when it was new).
    known = sample_child(process.pid, os.getpid(), {sample.key})
    assert known is not None
    assert (known.key, known.devices, known.sockets) == (sample.key, frozenset(), frozenset())
    # Another main process's child (a reused pid): not a connection of this server.
    assert sample_child(process.pid, os.getppid()) is None
    assert sample_child(process.pid, 1) is None


def test_a_zombie_child_keeps_its_counters_until_it_is_reaped(
    child: tuple[subprocess.Popen[str], Path],
) -> None:
    process, _ = child
    before = sample_child(process.pid, os.getpid())
    assert before is not None
    process.kill()
    wait_state(process.pid, "Z")
    zombie = sample_child(process.pid, os.getpid())
    assert zombie is not None
    assert zombie.zombie
    assert zombie.key == before.key
    assert zombie.devices == frozenset()  # its descriptors are closed
    assert zombie.io.rchar >= before.io.rchar
    process.wait(10)
    assert sample_child(process.pid, os.getpid()) is None
    assert process.pid not in children(os.getpid())


def test_a_pid_that_is_no_process_has_no_children_counters_or_sample() -> None:
    assert children(2**22 + 1) == []  # above pid_max: never a process
    assert read_io(2**22 + 1) is None
    assert sample_child(2**22 + 1, os.getpid()) is None


def _peer_of_accepted(family: int, listen: str, source: str) -> tuple[str, int, int]:
    """A connection from `source` to a listener on `listen`: the client's address and port
    as this process sees them, and the accepted socket's inode."""
    with socket.socket(family) as listener:
        if family == socket.AF_INET6:
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        listener.bind((listen, 0))
        listener.listen()
        port = listener.getsockname()[1]
        client_family = socket.AF_INET6 if ":" in source else socket.AF_INET
        target = "::1" if client_family == socket.AF_INET6 else "127.0.0.1"
        with socket.socket(client_family) as client:
            client.bind((source, 0))
            client.connect((target, port))
            accepted, _ = listener.accept()
            with accepted:
                inode = os.fstat(accepted.fileno()).st_ino
                peers = socket_peers(os.getpid())
                ends = peers[inode]
                assert ends.client[1] == client.getsockname()[1]
                # The server's end as the client names its peer (what a probe records).
                peer = client.getpeername()
                assert ends.server == (target, port) == (peer[0], peer[1])
                return ends.client[0], ends.client[1], inode


@pytest.mark.parametrize(
    ("family", "listen", "source", "shown"),
    [
        (socket.AF_INET, "127.0.0.1", "127.0.0.1", "127.0.0.1"),
        (socket.AF_INET6, "::1", "::1", "::1"),
        # A dual-stack listener sees an IPv4 client as ::ffff:127.0.0.2 (in tcp6).
        (socket.AF_INET6, "::", "127.0.0.2", "127.0.0.2"),
    ],
    ids=["ipv4", "ipv6", "ipv4-mapped"],
)
def test_socket_peers_finds_a_real_connection_by_its_inode(
    family: int, listen: str, source: str, shown: str
) -> None:
    address, _, _ = _peer_of_accepted(family, listen, source)
    assert address == shown


def test_boot_time_is_in_the_past() -> None:
    assert 0 < boot_time() < time.time()
