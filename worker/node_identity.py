"""This appliance's node id, stable for its lifetime.

Mappings, job records and routing keys carry the node id, so it must never drift: a worker
that comes back under another id calls its own live exports orphaned and adds a second
active row for every disk it serves again. An explicit `EXPORT_WORKER_NODE_ID` wins. Without
one, the first `run` writes the host name to `<state_dir>/node-id` and every later start
(and every command) reads it from there, so a recreated container, whose host name is a new
container id, keeps the id the first one chose.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import tempfile
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from worker.errors import WorkerError
from worker.nbd.files import fsync_dir
from worker.settings import NODE_ID_PATTERN, Settings

NODE_ID_FILE = "node-id"
#: Docker and podman name a container's host after the first 12 hex digits of its id.
_CONTAINER_ID = re.compile(r"[0-9a-f]{12}")
_CONTAINER_MARKERS = (Path("/.dockerenv"), Path("/run/.containerenv"))


class NodeIdSource(Enum):
    SETTING = "EXPORT_WORKER_NODE_ID"
    STATE_FILE = "state file"
    HOST_NAME = "host name"


class NodeIdError(WorkerError):
    """The state file holds no valid node id: refusing beats guessing another one."""


@dataclass(frozen=True)
class NodeIdentity:
    settings: Settings
    source: NodeIdSource
    #: Set when the id had to be chosen and could not be written down (it may drift).
    unsaved: str | None = None

    @property
    def node_id(self) -> str:
        return self.settings.node_id

    def container_warning(self) -> str | None:
        """Why the id is unfit, when it was not set and looks like a container's id: it
        was chosen by a container that a recreation replaces."""
        if self.source is NodeIdSource.SETTING or not in_container():
            return None
        if not _CONTAINER_ID.fullmatch(self.node_id):
            return None
        return (
            f"node id {self.node_id!r} ({self.source.value}) looks like a container id: "
            "set EXPORT_WORKER_NODE_ID to a name of this appliance"
        )


def in_container() -> bool:
    return any(marker.exists() for marker in _CONTAINER_MARKERS)


def settle_node_id(settings: Settings, *, persist: bool) -> NodeIdentity:
    """The node id in force: the setting, else the state file, else the host name, which
    `persist` writes to the state file (first start). Raises NodeIdError."""
    if "node_id" in settings.model_fields_set:
        return NodeIdentity(settings, NodeIdSource.SETTING)
    path = settings.state_dir / NODE_ID_FILE
    stored = _read(path)
    if stored is not None:
        return NodeIdentity(
            settings.model_copy(update={"node_id": stored}), NodeIdSource.STATE_FILE
        )
    chosen = socket.gethostname()
    if not re.fullmatch(NODE_ID_PATTERN, chosen):
        raise NodeIdError(
            f"the host name {chosen!r} is no valid node id: set EXPORT_WORKER_NODE_ID"
        )
    unsaved = None
    if persist:
        try:
            stored = _create(path, chosen)
        except OSError as exc:
            unsaved = f"cannot write {path}: {exc.strerror}"
        else:
            if stored != chosen:  # another process wrote it first: its id holds
                return NodeIdentity(
                    settings.model_copy(update={"node_id": stored}), NodeIdSource.STATE_FILE
                )
    return NodeIdentity(
        settings.model_copy(update={"node_id": chosen}), NodeIdSource.HOST_NAME, unsaved
    )


def _read(path: Path) -> str | None:
    try:
        text = path.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise NodeIdError(f"cannot read the node id from {path}: {exc.strerror}") from exc
    value = text.strip()
    if not re.fullmatch(NODE_ID_PATTERN, value):
        raise NodeIdError(
            f"{path} holds no valid node id ({value[:70]!r}): fix it, or set EXPORT_WORKER_NODE_ID"
        )
    return value


def _create(path: Path, node_id: str) -> str:
    """Writes `node_id` to `path` unless it exists (then returns what it holds): the file
    appears whole or not at all, and of two first starts only one id wins."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name of its own: two first starts in two containers may both be pid 1.
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    temp = Path(name)
    try:
        try:
            os.fchmod(fd, 0o644)
            os.write(fd, f"{node_id}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temp, path)  # fails if it exists: never overwrites an id in use
        except FileExistsError:
            pass
        else:
            fsync_dir(path.parent)
        # What the file holds now is the id, whoever wrote it.
        existing = _read(path)
        return existing if existing is not None else node_id
    finally:
        with contextlib.suppress(OSError):
            temp.unlink()
