"""Snippets in nbd-server's includedir and the export links they point at (the authfiles
that say who may connect: worker/nbd/authfiles.py).

All are written atomically and durably: a crash leaves the old file or the new one,
never a torn one, and never a second file defining the same export.
"""

from __future__ import annotations

import contextlib
import errno
import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from worker.errors import ConfigWriteError

#: nbd-server's includedir reads regular files ending in `.conf` only (nbd-server-facts.md),
#: so a temporary name that does not end in `.conf` is never half-read by a reload.
SNIPPET_SUFFIX = ".conf"
TEMP_SUFFIX = ".tmp"
SNIPPET_MODE = 0o644


@dataclass(frozen=True)
class DataPathOptions:
    """The per-export options that decide what a copy tool gets; nbd-server defaults each
    to off. Never the harmful ones (nbd-server-facts.md): copyonwrite (writes vanish at
    disconnect), temporary, filesize (creates a file when the link dangles),
    maxconnections (a lifetime count), sync (an fsync per write)."""

    #: FLUSH: fsync() of the device on the client's request (`nbdcopy --flush`).
    flush: bool = True
    #: FUA: a write that is durable when answered.
    fua: bool = True
    #: TRIM: discards (a hole punch on a file), so thin volumes get space back.
    trim: bool = True

    def lines(self) -> list[str]:
        # nbd-server accepts only true/false/1/0 for booleans.
        return [
            f"{key} = {'true' if value else 'false'}"
            for key, value in (("flush", self.flush), ("fua", self.fua), ("trim", self.trim))
        ]


@dataclass(frozen=True)
class ExportSpec:
    """One export as the server sees it: a section name, the link it opens, its options."""

    name: str
    link_path: Path
    options: DataPathOptions = DataPathOptions()
    #: Who may connect (read by the server on every connection). None only in tests of
    #: snippets as they were before exports had access control.
    authfile: Path | None = None
    #: TLS clients only (`force_tls`): a plain client gets NBD_REP_ERR_TLS_REQD.
    force_tls: bool = False


def render_snippet(spec: ExportSpec) -> str:
    """The config snippet for one export.

    `name` and `link_path` come from validated ids and settings only, the options from
    settings: no request text reaches this file. The device itself sits behind the link,
    so a device change never needs a config edit (a reload ignores changes to existing
    sections anyway).
    """
    return "".join(
        f"{line}\n"
        for line in (
            "# Managed by nbd-export-worker; removing it stops the export after the next restart.",
            f"[{spec.name}]",
            f"exportname = {spec.link_path}",
            *([f"authfile = {spec.authfile}"] if spec.authfile is not None else []),
            *spec.options.lines(),
            *(["force_tls = true"] if spec.force_tls else []),
        )
    )


def snippet_exportname(content: str) -> str | None:
    """The `exportname` a snippet's text sets, or None."""
    for line in content.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == "exportname":
            return value.strip()
    return None


def snippet_path(conf_dir: Path, name: str) -> Path:
    return conf_dir / f"{name}{SNIPPET_SUFFIX}"


def fsync_dir(directory: Path) -> None:
    """Makes renames and new links in `directory` durable (a batch calls this once)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def nearest_existing(path: Path) -> Path:
    """`path`, or the nearest of its parents that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def make_worker_dir(directory: Path) -> None:
    """Creates a directory the worker writes and nbd-server (often another user) enters,
    and any missing parent: each mode 0755 whatever the umask. One that exists keeps the
    mode its installer gave it. Raises ConfigWriteError."""
    missing = []
    part = directory
    while not part.exists():
        missing.append(part)
        part = part.parent
    try:
        if not missing and not directory.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(directory))
        for part in reversed(missing):
            part.mkdir(exist_ok=True)
            part.chmod(0o755)
    except OSError as exc:
        raise ConfigWriteError("create", exc.filename, exc.strerror) from exc


def worker_dir_problem(directory: Path) -> str | None:
    """Why the worker could not write in `directory`, or None: it is a writable directory,
    or it is missing and make_worker_dir could create it (its nearest existing parent is
    a writable directory)."""
    if directory.is_dir():
        return None if os.access(directory, os.W_OK | os.X_OK) else "not writable"
    parent = nearest_existing(directory)
    if not parent.is_dir():
        return f"{parent} is not a directory"
    if os.access(parent, os.W_OK | os.X_OK):
        return None
    return f"missing, and {parent} does not let the worker create it"


def _discard(temp: Path) -> None:
    """Removes a temporary left by a failed write. On a read-only or broken filesystem
    that fails too (EROFS even for a missing file): the write's own error is the one to
    report, so this one is dropped."""
    with contextlib.suppress(OSError):
        temp.unlink(missing_ok=True)


def _replace_file(target: Path, content: bytes, mode: int, *, sync_dir: bool) -> None:
    """Writes `content` to a hidden temporary name, fsyncs it, renames it over `target`
    (and, with sync_dir, fsyncs the directory). Raises OSError, leaving no temporary."""
    temp = target.with_name(f".{target.name}{TEMP_SUFFIX}")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
        try:
            # Exactly this mode whatever the umask: nbd-server (often another user) must
            # read it; nobody but the worker may change it.
            os.fchmod(fd, mode)
            os.write(fd, content)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, target)
        if sync_dir:
            fsync_dir(target.parent)
    except OSError:
        _discard(temp)
        raise


class SnippetWrite(Enum):
    UNCHANGED = "unchanged"
    CREATED = "created"
    REPLACED = "replaced"
    """An existing snippet opened another path. A reload ignores changes to a section the
    server already has, so a loaded export keeps serving the old path until a restart."""
    OPTIONS_CHANGED = "options_changed"
    """An existing snippet opened the same link with other options (one written before
    the data-path options or the authfile line, or with other settings): harmless to
    rewrite; a loaded export keeps its old options until a restart."""


def write_snippet(conf_dir: Path, spec: ExportSpec, *, sync_dir: bool = True) -> SnippetWrite:
    """Writes the export's snippet unless an identical one is there. With sync_dir=False
    the caller must fsync `conf_dir` itself before relying on it.

    Raises ConfigWriteError (retryable) when the directory cannot be written.
    """
    target = snippet_path(conf_dir, spec.name)
    content = render_snippet(spec).encode()
    outcome = SnippetWrite.CREATED
    try:
        existing = target.read_bytes()
        if existing == content:
            return SnippetWrite.UNCHANGED
        same_link = snippet_exportname(existing.decode(errors="replace")) == str(spec.link_path)
        outcome = SnippetWrite.OPTIONS_CHANGED if same_link else SnippetWrite.REPLACED
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ConfigWriteError("read snippet", target, exc.strerror) from exc
    try:
        _replace_file(target, content, SNIPPET_MODE, sync_dir=sync_dir)
    except OSError as exc:
        raise ConfigWriteError("write snippet", target, exc.strerror) from exc
    return outcome


def has_snippet(conf_dir: Path, name: str) -> bool:
    return snippet_path(conf_dir, name).is_file()


def snippet_outdated(conf_dir: Path, spec: ExportSpec) -> bool:
    """Whether the export's snippet opens its link with other options than the worker
    writes now (e.g. one written before the data-path options): safe to rewrite."""
    try:
        content = snippet_path(conf_dir, spec.name).read_text()
    except (OSError, UnicodeDecodeError):
        return False
    return content != render_snippet(spec) and snippet_exportname(content) == str(spec.link_path)


def point_link(link_path: Path, device_path: str, *, sync_dir: bool = True) -> bool:
    """Points `link_path` at `device_path` atomically; True if it changed anything. With
    sync_dir=False the caller must fsync the link's directory itself.

    nbd-server opens the export's path afresh for every connection and follows links,
    so new connections open the new device while established ones keep theirs.
    """
    if link_target(link_path) == device_path:
        return False
    temp = link_path.with_name(f".{link_path.name}{TEMP_SUFFIX}")
    try:
        temp.unlink(missing_ok=True)
        os.symlink(device_path, temp)
        os.replace(temp, link_path)
        if sync_dir:
            fsync_dir(link_path.parent)
    except OSError as exc:
        _discard(temp)
        raise ConfigWriteError("point link", link_path, exc.strerror) from exc
    return True


def link_target(link_path: str | Path) -> str | None:
    try:
        return os.readlink(link_path)
    except OSError:
        return None


def remove_export_files(conf_dir: Path, spec: ExportSpec) -> None:
    """Removes the export's snippet and link, durably; missing files are fine."""
    try:
        snippet_path(conf_dir, spec.name).unlink(missing_ok=True)
        fsync_dir(conf_dir)
        spec.link_path.unlink(missing_ok=True)
        fsync_dir(spec.link_path.parent)
    except OSError as exc:
        raise ConfigWriteError("remove files of", spec.name, exc.strerror) from exc


def list_snippet_names(conf_dir: Path, prefix: str) -> set[str]:
    """Export names of the snippets in `conf_dir` whose names start with `prefix`."""
    return {
        p.name[: -len(SNIPPET_SUFFIX)]
        for p in conf_dir.glob(f"{prefix}*{SNIPPET_SUFFIX}")
        if p.is_file()
    }
