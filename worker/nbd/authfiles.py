"""Authfiles: who may connect to each export, written atomically and durably, and what
the reuse path remembers of them.

nbd-server reads an export's authfile on every connection (no reload), and admits everyone
when it is missing or unreadable: so one is emptied, never deleted, and written before the
snippet that names it. The cache (Authfiles) needs no lock: it only reads, and a file found
right is remembered by its identity.
"""

from __future__ import annotations

import functools
import os
import re
import stat
from collections.abc import Callable, Iterable
from enum import Enum
from pathlib import Path

from worker.access import authfile_line
from worker.errors import ConfigWriteError
from worker.nbd.files import _replace_file, nearest_existing
from worker.nbd.process import file_credentials

AUTHFILE_SUFFIX = ".allow"
_SAFE_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
#: Read by nbd-server (often another user) on every connection; written by the worker only.
AUTHFILE_MODE = 0o644
#: Authfiles whose last good reading is kept for the reuse path (then forgotten at once).
MAX_REMEMBERED_DOORS = 20_000


def safe_export_name(name: str) -> bool:
    """Whether `name` may name files (export names come from validated ids; this guards the
    names read back from the database or from snippet file names)."""
    return _SAFE_NAME.fullmatch(name) is not None


def _checked(name: str) -> str:
    if not safe_export_name(name):
        raise ValueError(f"not a name the worker gives an export: {name[:80]!r}")
    return name


def authfile_path(auth_dir: Path, name: str) -> Path:
    """Fixed by the export's name: the snippet names it once, and a reload never changes
    what a loaded export reads, so the path must never move. Raises ValueError for a name
    the worker never gives."""
    return auth_dir / f"{_checked(name)}{AUTHFILE_SUFFIX}"


def render_authfile(name: str, admitted: Iterable[str]) -> bytes:
    """Who may connect to `name`, one network per line (nothing admitted: nobody may). The
    addresses come from `normalize_client_addresses` only (digits, hex, `.`, `:`, `/`), the
    name is checked: nothing else reaches the file, and every line is far below
    nbd-server's 256-character line buffer."""
    lines = [f"# Managed by nbd-export-worker: who may connect to {_checked(name)}."]
    entries = [authfile_line(address) for address in admitted]
    if not entries:
        # An empty authfile refuses everyone; a missing one would admit everyone.
        lines.append(
            "# Nobody: the export was released (the server keeps its name until it restarts)."
        )
    return "".join(f"{line}\n" for line in lines + list(dict.fromkeys(entries))).encode()


class AuthfileState(Enum):
    OK = "ok"
    MISSING = "missing"
    #: Not a regular file, not readable by everyone (the server's user), or not readable.
    UNREADABLE = "unreadable"
    WRONG = "wrong"


def authfile_state(path: str | Path, expected: bytes) -> AuthfileState:
    """Whether the authfile is in place with `expected` content, and readable by the server
    (nbd-server admits everyone when it cannot read it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return AuthfileState.MISSING
    except OSError:
        return AuthfileState.UNREADABLE
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not st.st_mode & stat.S_IROTH:
            return AuthfileState.UNREADABLE
        content = os.read(fd, len(expected) + 1)
    except OSError:
        return AuthfileState.UNREADABLE
    finally:
        os.close(fd)
    return AuthfileState.OK if content == expected else AuthfileState.WRONG


def write_authfile(path: Path, content: bytes, *, sync_dir: bool = True) -> bool:
    """Puts `content` in the authfile unless it is there already; True if it wrote. The
    server reads it on the next connection: no reload. With sync_dir=False the caller must
    fsync the directory itself before relying on it. Raises ConfigWriteError."""
    if authfile_state(path, content) is AuthfileState.OK:
        return False
    try:
        _replace_file(path, content, AUTHFILE_MODE, sync_dir=sync_dir)
    except OSError as exc:
        raise ConfigWriteError("write authfile", path, exc.strerror) from exc
    return True


def searchable_by(directory: Path, uid: int, gids: set[int]) -> bool:
    """Whether a process with these (file-system) ids can reach files in `directory`: it
    and every directory above it searchable (nbd-server admits everyone when it cannot
    open an authfile, so a directory it cannot enter opens every export)."""
    if uid == 0:
        return True
    for part in (directory, *directory.parents):
        try:
            st = os.stat(part)
        except OSError:
            return False
        if st.st_uid == uid:
            bit = stat.S_IXUSR
        elif st.st_gid in gids:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


def invalid_clients(name: str, exc: ValueError) -> ConfigWriteError:
    """A corrupt client_addresses column: never guess who may connect."""
    return ConfigWriteError("write the authfile of", name, f"invalid client_addresses ({exc})")


@functools.lru_cache(maxsize=4096)
def _authfile_for(name: str, client_addresses: tuple[str, ...], source: str) -> bytes:
    # Cached: the reuse path compares every job's authfile, and parsing the addresses
    # again costs more than reading the file.
    return render_authfile(name, [*client_addresses, source])


def auth_dir_problem(auth_dir: Path, pid: int) -> str | None:
    """Why the running server (`pid`) cannot read the authfiles in `auth_dir`, if it cannot
    (it would then admit everyone to every export). Raises ServerUnavailable."""
    uid, gids = file_credentials(pid)
    # Before the first run it may not exist yet: run makes it (and any missing parent)
    # 0755, so the directories above it decide.
    if searchable_by(nearest_existing(auth_dir), uid, gids):
        return None
    return (
        f"nbd-server (pid {pid}, uid {uid}) cannot enter {auth_dir}: it "
        "admits everyone to every export; make the directory and those above it "
        "searchable by that user"
    )


class Authfiles:
    """The authfiles in `auth_dir` as the server must find them: each one's content (the
    clients a job names, and the probes' own address from `source`) and whether it is in
    place."""

    def __init__(self, auth_dir: Path, source: Callable[[], str]) -> None:
        self._auth_dir = auth_dir
        self._source = source
        #: name -> (the authfile's identity when last found right, its content then).
        self._doors: dict[str, tuple[tuple[int, int, int, int], bytes]] = {}
        #: name -> its authfile's path, built once (a Path a job cost more than the lstat).
        self._paths: dict[str, str] = {}

    def content(self, name: str, client_addresses: tuple[str, ...] | None) -> bytes:
        """The authfile `name` must have: `client_addresses` and the probes' own address
        (None: released, nobody may connect)."""
        if client_addresses is None:
            return render_authfile(name, [])
        return _authfile_for(name, client_addresses, self._source())

    def state(self, name: str, client_addresses: tuple[str, ...] | None) -> AuthfileState:
        """Whether `name`'s authfile admits exactly `client_addresses` (None: nobody)."""
        return authfile_state(
            authfile_path(self._auth_dir, name),
            self.content(name, client_addresses),
        )

    def admits(self, name: str, client_addresses: tuple[str, ...]) -> bool:
        """Whether `name`'s authfile is in place and admits exactly these addresses: for
        the reuse path, one lstat when the file is as it was last read and found right
        (a change moves its ctime, which no one can set; on kernels without fine-grained
        timestamps a change within the same clock tick, a few ms, could go unseen until
        the next), else a small read."""
        path = self._paths.get(name)
        if path is None:
            path = str(authfile_path(self._auth_dir, name))  # checks the name
            if len(self._paths) >= MAX_REMEMBERED_DOORS:
                self._paths.clear()
            self._paths[name] = path
        expected = self.content(name, client_addresses)
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
