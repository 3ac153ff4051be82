"""nbd-server's connections, read from outside: one sample of the main process's children.

nbd-server forks one child per accepted connection, before negotiation; the child opens
the export's device only once the client commits to an export the authfile admits
(nbd-server-facts.md, "Connections, from outside the server"). So a child is a connection
of an export exactly when one of its descriptors is that export's device; a child still
negotiating, or refused, has none.

Read-only, and only what the kernel shows the same user: /proc/MAIN/task/MAIN/children,
/proc/CHILD/{stat,fd,io}, /proc/MAIN/net/tcp{,6}. No signal, no ptrace attach, nothing
written. Checked on the project's build (docs/architecture.md, "The live view"): a child's
`write_bytes`, capped by its `wchar`, is the data written through it (zeroes go by
fallocate and add nothing), and
the main process's counters grow by a child's whole counters when it reaps it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import stat
from collections.abc import Container
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

#: A device as the kernel names it: ("b", rdev) for a block device, ("f", dev, inode) for
#: a regular file. Path strings would not do: the child's descriptor names the link's
#: target, and one device has many names.
DeviceKey = tuple[str, int] | tuple[str, int, int]

PROC = Path("/proc")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class IoCounters:
    """From /proc/PID/io."""

    rchar: int = 0
    wchar: int = 0
    write_bytes: int = 0

    def __sub__(self, other: IoCounters) -> IoCounters:
        return IoCounters(
            self.rchar - other.rchar,
            self.wchar - other.wchar,
            self.write_bytes - other.write_bytes,
        )


@dataclass(frozen=True)
class ChildSample:
    """One per-connection child, as sampled."""

    pid: int
    #: With the pid, names the process (pids are reused).
    start_ticks: int
    devices: frozenset[DeviceKey]
    sockets: frozenset[int]
    io: IoCounters
    #: Ended, not yet reaped: its descriptors are closed, its counters still readable (and
    #: not yet added to the main process's).
    zombie: bool = False

    @property
    def key(self) -> tuple[int, int]:
        return (self.pid, self.start_ticks)


def device_key(st: os.stat_result) -> DeviceKey | None:
    if stat.S_ISBLK(st.st_mode):
        return ("b", st.st_rdev)
    if stat.S_ISREG(st.st_mode):
        return ("f", st.st_dev, st.st_ino)
    return None


def path_device_key(path: str | Path) -> DeviceKey | None:
    """The device a path opens now (links followed); None when it opens nothing."""
    try:
        return device_key(os.stat(path))
    except OSError:
        return None


def parse_io(text: str) -> IoCounters:
    fields = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)
    return IoCounters(
        rchar=int(fields.get("rchar", 0)),
        wchar=int(fields.get("wchar", 0)),
        write_bytes=int(fields.get("write_bytes", 0)),
    )


def read_io(pid: int) -> IoCounters | None:
    try:
        return parse_io((PROC / str(pid) / "io").read_text())
    except (OSError, ValueError):
        return None


def children(main_pid: int) -> list[int]:
    """The main process's children (its per-connection processes). Needs a kernel with
    CONFIG_PROC_CHILDREN (Debian's and every major distribution's have it)."""
    path = PROC / str(main_pid) / "task" / str(main_pid) / "children"
    try:
        return [int(pid) for pid in path.read_text().split()]
    except FileNotFoundError:
        return []


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def sample_child(
    pid: int, main_pid: int, known: Container[tuple[int, int]] = ()
) -> ChildSample | None:
    """The child's devices, sockets and counters; None when it is gone or is not the main
    process's child (a reused pid). Only the counters of a `known` child (pid, start
    ticks) and of a zombie: its descriptors were read when it was new (about 0.2 ms a
    child, most of it the descriptors)."""
    fields = _stat_fields(pid)
    if fields is None or int(fields[1]) != main_pid or fields[0] == "X":
        return None
    start_ticks = int(fields[19])
    if fields[0] == "Z" or (pid, start_ticks) in known:
        io = read_io(pid)
        if io is None:
            return None
        return ChildSample(pid, start_ticks, frozenset(), frozenset(), io, zombie=fields[0] == "Z")
    fd_dir = PROC / str(pid) / "fd"
    devices: set[DeviceKey] = set()
    sockets: set[int] = set()
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return None
    for name in names:
        try:
            target = os.readlink(fd_dir / name)
        except OSError:
            continue
        if target.startswith("socket:["):
            sockets.add(int(target[8:-1]))
        elif target.startswith("/") and not target.startswith("/dev/null"):
            with contextlib.suppress(OSError):
                key = device_key(os.stat(fd_dir / name))
                if key is not None:
                    devices.add(key)
    io = read_io(pid)
    if io is None:
        return None
    return ChildSample(pid, start_ticks, frozenset(devices), frozenset(sockets), io)


def _address(hex_address: str) -> tuple[str, int]:
    """`0100007F:1F90` (IPv4) or 32 hex digits (IPv6), each 32-bit word in host order."""
    host, _, port = hex_address.partition(":")
    raw = b"".join(int(host[i : i + 8], 16).to_bytes(4, "little") for i in range(0, len(host), 8))
    address = ipaddress.ip_address(raw)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address), int(port, 16)


class SocketEnds(NamedTuple):
    """A server-side TCP socket's two ends, each (address, port)."""

    #: The remote end: the client.
    client: tuple[str, int]
    #: The local end: the address and port the client connected to.
    server: tuple[str, int]


def parse_tcp_table(text: str) -> dict[int, SocketEnds]:
    """/proc/net/tcp or tcp6: socket inode -> its two ends."""
    ends = {}
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 9 and fields[9] != "0":
            ends[int(fields[9])] = SocketEnds(_address(fields[2]), _address(fields[1]))
    return ends


def socket_peers(main_pid: int) -> dict[int, SocketEnds]:
    """The TCP sockets of the server's network namespace: inode -> its client and server
    ends."""
    ends: dict[int, SocketEnds] = {}
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            ends.update(parse_tcp_table((PROC / str(main_pid) / "net" / table).read_text()))
    return ends


def boot_time() -> float:
    """The wall-clock time the kernel booted (start times are ticks after it)."""
    for line in (PROC / "stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise OSError("no btime in /proc/stat")
