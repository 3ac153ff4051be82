"""Which device paths a job may name, and what device they name.

A path must be under an allowed root both as given and after resolving links, exist, and be
a block device (a regular file only when settings allow, for development) that this host
does not use itself (mounted, swap, or held by device-mapper/md). Two paths naming one
device (/dev/vdb and its /dev/disk/by-id link) have the same `device_id`.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from worker.errors import DeviceNotFound, FlushFailed, InvalidRequest

SECTOR_BYTES = 512
#: Paths whose resolution is remembered; past this many, forgotten all at once.
MAX_RESOLVED_PATHS = 20_000


@dataclass(frozen=True)
class Device:
    path: str
    resolved: str
    #: "blk:MAJOR:MINOR" or, for a regular file, "file:DEV:INODE": the same for every
    #: path that names this device, so the database can refuse a second active mapping.
    device_id: str
    size_bytes: int


def _block_size(rdev: int) -> int:
    sysfs = Path(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}/size")
    return int(sysfs.read_text()) * SECTOR_BYTES


def _mounted_devices() -> set[str]:
    # Field 3 of mountinfo is the mounted filesystem's MAJOR:MINOR.
    with open("/proc/self/mountinfo") as f:
        return {line.split()[2] for line in f}


def _swap_rdevs() -> set[int]:
    rdevs = set()
    with open("/proc/swaps") as f:
        for line in f.readlines()[1:]:
            try:
                rdevs.add(os.stat(line.split()[0]).st_rdev)
            except (OSError, IndexError):
                continue
    return rdevs


def host_use(rdev: int) -> str | None:
    """Why this host itself uses the block device (or one of its partitions), or None."""
    majmin = f"{os.major(rdev)}:{os.minor(rdev)}"
    sysfs = Path(f"/sys/dev/block/{majmin}")
    mounted = _mounted_devices()
    numbers = {majmin}
    if sysfs.is_dir():
        numbers |= {
            (child / "dev").read_text().strip()
            for child in sysfs.iterdir()
            if (child / "partition").exists() and (child / "dev").exists()
        }
    if numbers & mounted:
        return "mounted by this host"
    if rdev in _swap_rdevs():
        return "used as swap by this host"
    for number in numbers:
        holders = Path(f"/sys/dev/block/{number}/holders")
        if holders.is_dir() and any(holders.iterdir()):
            return "held by device-mapper or md on this host"
    return None


#: /dev/disk/by-id/ prefixes under which a hypervisor's disk shows its serial: virtio-blk,
#: then virtio-scsi (QEMU's SCSI disks), as CloudStack's KVM agent attaches volumes.
VOLUME_LINK_PREFIXES = ("virtio-", "scsi-0QEMU_QEMU_HARDDISK_")
#: The serial a volume shows: its UUID without hyphens, cut to virtio-blk's 20 characters.
VOLUME_SERIAL_LENGTH = 20


def volume_links(by_id_dir: Path, volume_id: str) -> list[str]:
    """Where udev links a volume's disk, most likely first. `volume_id` is validated."""
    serial = volume_id.replace("-", "").lower()[:VOLUME_SERIAL_LENGTH]
    return [str(by_id_dir / f"{prefix}{serial}") for prefix in VOLUME_LINK_PREFIXES]


@dataclass(frozen=True)
class DevicePolicy:
    roots: tuple[Path, ...]
    allow_regular_files: bool = False
    #: Where a volume_id is looked for (by its serial).
    by_id_dir: Path = Path("/dev/disk/by-id")
    #: How long to wait for udev to create a just-attached volume's link.
    udev_wait_s: float = 5.0
    udev_poll_s: float = 0.05
    #: What each path resolved to, and the inodes it was seen through (_resolve).
    _resolved: dict[str, tuple[tuple[int, ...], str]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    async def resolve(self, device_path: str | None, volume_id: str | None) -> Device:
        """The device a job names by path or by volume. Raises InvalidRequest or
        DeviceNotFound; never guesses: a volume is found by its serial's link or not at all."""
        if device_path is not None:
            return self.check(device_path)
        if volume_id is None:
            raise InvalidRequest("give exactly one of device_path and volume_id")
        links = volume_links(self.by_id_dir, volume_id)
        deadline = time.monotonic() + self.udev_wait_s
        while True:
            for link in links:
                if os.path.lexists(link):  # noqa: ASYNC240 - one lstat of a /dev name
                    return self.check(link)
            if time.monotonic() >= deadline:
                raise DeviceNotFound(
                    f"no device for volume {volume_id} after {self.udev_wait_s:g} s: none of "
                    f"{', '.join(links)} exists"
                )
            await asyncio.sleep(self.udev_poll_s)

    @functools.cached_property
    def _root_prefixes(self) -> tuple[str, ...]:
        """Each root as given and as resolved (e.g. /dev and what a link to it names),
        resolved once: resolving costs a syscall per path component, on every job."""
        prefixes = {str(root) for root in self.roots} | {str(r.resolve()) for r in self.roots}
        return tuple(sorted(prefixes))

    def _under_root(self, path: str) -> bool:
        return any(
            path == root or path.startswith(root.rstrip("/") + "/") for root in self._root_prefixes
        )

    def _resolve(self, device_path: str) -> tuple[str, os.stat_result]:
        """realpath(strict=True) of `device_path` and the stat of what it names. Python's
        realpath lstats every component (a tenth of the reuse path's CPU in a profile), so
        a path whose first link (lstat) and final file (stat) are the very inodes seen last
        time, unchanged (a re-pointed link is a new inode), resolves as it did then: two
        syscalls. Raises OSError."""
        first = os.lstat(device_path)
        st = os.stat(device_path) if stat.S_ISLNK(first.st_mode) else first
        key = (first.st_dev, first.st_ino, first.st_ctime_ns, st.st_dev, st.st_ino, st.st_rdev)
        seen = self._resolved.get(device_path)
        if seen is not None and seen[0] == key:
            return seen[1], st
        resolved = os.path.realpath(device_path, strict=True)
        st = os.stat(resolved)
        if len(self._resolved) >= MAX_RESOLVED_PATHS:
            self._resolved.clear()
        # Keyed by what was seen before resolving: a change in between shows at next check.
        self._resolved[device_path] = (key, resolved)
        return resolved, st

    def check(self, device_path: str) -> Device:
        """The device a job names. Raises InvalidRequest or DeviceNotFound.

        Checked before and after resolving links: /dev/disk/by-id names are links, and a
        link that leads outside the roots must not smuggle another file in.
        """
        if not self._under_root(device_path):
            raise InvalidRequest(f"device_path {device_path} is not under an allowed device root")
        try:
            resolved, st = self._resolve(device_path)
        except FileNotFoundError:
            raise DeviceNotFound(f"device {device_path} does not exist") from None
        except OSError as exc:
            raise DeviceNotFound(f"device {device_path} is not accessible: {exc.strerror}") from exc
        if not self._under_root(resolved):
            raise InvalidRequest(f"device_path {device_path} resolves outside the allowed roots")
        if stat.S_ISBLK(st.st_mode):
            reason = host_use(st.st_rdev)
            if reason is not None:
                raise InvalidRequest(f"device {device_path} is {reason}; refusing to export it")
            device_id = device_identity(st)
            try:
                size = _block_size(st.st_rdev)
            except (OSError, ValueError):
                size = -1  # unknown: no sysfs (a container without it); not checked then
            return Device(device_path, resolved, device_id, size)
        if stat.S_ISREG(st.st_mode) and self.allow_regular_files:
            return Device(device_path, resolved, device_identity(st), st.st_size)
        raise InvalidRequest(f"device_path {device_path} is not a block device")


def device_identity(st: os.stat_result) -> str:
    """A device's `device_id`: the same for every path that names it."""
    if stat.S_ISBLK(st.st_mode):
        return f"blk:{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    return f"file:{st.st_dev}:{st.st_ino}"


def _errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, "error")


#: open() errors that mean the device is not there (any more): detached, or never attached.
_GONE = frozenset({errno.ENOENT, errno.ENXIO, errno.ENODEV})


def open_device(path: Path, device_id: str) -> int:
    """A read-only descriptor of the device `path` opens (an export's link), once it is
    sure that device is `device_id`: a link re-pointed since must not make another
    device's flush pass for this one. Raises FlushFailed (device_gone when it is not
    there). Read-only is enough for fsync() and needs the least."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise FlushFailed(
            f"cannot open {path}: {_errno_name(exc)} ({exc.strerror})",
            _errno_name(exc),
            device_gone=exc.errno in _GONE,
        ) from exc
    try:
        found = device_identity(os.fstat(fd))
    except OSError as exc:
        os.close(fd)
        raise FlushFailed(f"cannot stat {path}: {exc.strerror}", _errno_name(exc)) from exc
    if found != device_id:
        os.close(fd)
        raise FlushFailed(
            f"{path} opens device {found}, not {device_id} as its mapping says; "
            "reconciliation will re-point it, then flush again"
        )
    return fd


class HeldDevices:
    """One read-only descriptor per export's device, opened when the export is prepared.

    Linux reports a writeback error once per open file (errseq): a descriptor opened after
    the error was reported to someone else (nbd-server answering a copy tool's FLUSH or
    FUA) would never see it. One opened before the copy starts sees every error since.
    The map belongs to the event loop's thread; opens and fsyncs run elsewhere, on
    duplicates, so a descriptor closed here is never one a thread still uses.
    """

    def __init__(self) -> None:
        self._fds: dict[str, tuple[str, int]] = {}

    def __len__(self) -> int:
        return len(self._fds)

    def holds(self, name: str, device_id: str) -> bool:
        held = self._fds.get(name)
        return held is not None and held[0] == device_id

    def put(self, name: str, device_id: str, fd: int) -> None:
        """Keeps `fd` for `name` (closing whatever was held for it before)."""
        self.drop(name)
        self._fds[name] = (device_id, fd)

    def dup(self, name: str, device_id: str) -> int | None:
        """A duplicate of the descriptor held for `name` on `device_id`, for a thread to
        fsync and close; None when none is held."""
        held = self._fds.get(name)
        return os.dup(held[1]) if held is not None and held[0] == device_id else None

    def drop(self, name: str) -> None:
        held = self._fds.pop(name, None)
        if held is not None:
            os.close(held[1])

    def close(self) -> None:
        for name in list(self._fds):
            self.drop(name)


def fsync_descriptor(fd: int, path: Path) -> None:
    """fsync()s `fd`; blocks, maybe for long (a network volume's dirty pages). Raises
    FlushFailed(lost_writes=True) naming the errno."""
    try:
        os.fsync(fd)
    except OSError as exc:
        raise FlushFailed(
            f"fsync of {path} failed: {_errno_name(exc)} ({exc.strerror})",
            _errno_name(exc),
            lost_writes=True,
        ) from exc


def fsync_device(path: Path, device_id: str, held: int | None) -> None:
    """Makes durable what was written to the device `path` opens: fsync of `held` (a
    duplicate of the descriptor opened when the export was prepared, closed here: it sees
    every writeback error since), then of a descriptor opened now (the device the path
    opens today: a volume detached and attached again, even under the same numbers, is
    another device). Blocks: run it in a thread. Raises FlushFailed."""
    try:
        fresh = open_device(path, device_id)
        try:
            if held is not None:
                fsync_descriptor(held, path)
            fsync_descriptor(fresh, path)
        finally:
            os.close(fresh)
    finally:
        if held is not None:
            os.close(held)


def device_size(device_path: str) -> int | None:
    """The size in bytes of what the path names now, or None when it cannot be told."""
    try:
        st = os.stat(device_path)
        if stat.S_ISBLK(st.st_mode):
            return _block_size(st.st_rdev)
        if stat.S_ISREG(st.st_mode):
            return st.st_size
    except (OSError, ValueError):
        pass
    return None


def device_present(device_path: str) -> bool:
    """Whether the device (or what its link points at) exists now: a local stat, no wait."""
    return os.path.exists(device_path)
