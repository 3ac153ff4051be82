"""nbd-server's main config file, as the running main process reads it.

The worker learns which file that is from the process's own command line (`-C`), so an
operator need not repeat it in the worker's settings; EXPORT_WORKER_NBD_CONFIG_FILE only pins
it. What the worker needs of that file is one line: `includedir` must be the directory it
writes snippets to, or every export it creates is written where the server never looks
(each job would wait for an export that cannot appear). That is a configuration error, not a
passing fault: jobs are answered at once, not retried.
"""

from __future__ import annotations

import configparser
import errno
import os
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

from worker.errors import ServerMisconfigured

#: Where nbd-server looks when started without -C.
DEFAULT_CONFIG_FILE = "/etc/nbd-server/config"


def config_from_cmdline(argv: Sequence[str]) -> str:
    """The config file an nbd-server command line uses (-C, --config-file, or the default)."""
    config = DEFAULT_CONFIG_FILE
    for i, arg in enumerate(argv):
        if arg in ("-C", "--config-file") and i + 1 < len(argv):
            config = argv[i + 1]
        elif arg.startswith("--config-file="):
            config = arg.split("=", 1)[1]
        elif arg.startswith("-C") and len(arg) > 2:
            config = arg[2:]
    return config


class _KeyFile(configparser.ConfigParser):
    """nbd-server reads its config with GLib's key-file parser: keys are case-sensitive
    (`IncludeDir` is not `includedir`) and a `#` after a value is part of the value."""

    def optionxform(self, optionstr: str) -> str:
        return optionstr


def read_server_config(path: Path) -> configparser.ConfigParser:
    """Raises OSError or configparser.Error."""
    parser = _KeyFile(interpolation=None, strict=False)
    parser.read_string(path.read_text())
    return parser


def generic_section(config: configparser.ConfigParser) -> Mapping[str, str]:
    return config["generic"] if config.has_section("generic") else {}


#: As the kernel's limit on symlinks followed in one lookup.
MAX_SYMLINKS = 40


def resolve_in_root(root: Path, path: str) -> Path:
    """`path` (absolute) as a process whose root directory is `root` finds it: each symlink
    on the way is followed inside `root`. Joining `root / path` is not enough, since the
    kernel follows an absolute symlink from the reader's own root. Raises OSError."""
    resolved = PurePosixPath("/")
    pending = list(PurePosixPath(path).parts[1:])
    followed = 0
    while pending:
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            resolved = resolved.parent
            continue
        here = root / str(resolved / part).lstrip("/")
        if not here.is_symlink():
            resolved /= part
            continue
        followed += 1
        if followed > MAX_SYMLINKS:
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(path))
        target = PurePosixPath(os.readlink(here))
        if target.is_absolute():
            resolved = PurePosixPath("/")
            pending = list(target.parts[1:]) + pending
        else:
            pending = list(target.parts) + pending
    return root / str(resolved).lstrip("/")


def as_seen_by(pid: int, path: str) -> Path:
    """`path` as process `pid` sees it: through its root, so a server in a container of its
    own is read as it reads its files. Raises OSError."""
    return resolve_in_root(Path(f"/proc/{pid}/root"), path)


def includedir_problem(generic: Mapping[str, str], conf_dir: Path) -> str | None:
    """Why snippets written to `conf_dir` would never load, or None when they will."""
    includedir = str(generic.get("includedir", "")).strip()
    if not includedir:
        return f"it has no includedir; set includedir = {conf_dir} in [generic]"
    if not os.path.isabs(includedir):
        # The daemon does chdir("/"): a relative includedir makes every reload a no-op.
        return f"its includedir {includedir!r} is relative; set includedir = {conf_dir}"
    if os.path.normpath(includedir) != os.path.normpath(conf_dir):
        return (
            f"its includedir is {includedir}, but the worker writes snippets to {conf_dir} "
            "(EXPORT_WORKER_NBD_CONF_DIR): make them the same"
        )
    return None


def main_config_generic(pid: int, config: str) -> Mapping[str, str]:
    """The [generic] section of `config`, the config file of main process `pid`, read as
    that process reads it. Raises ServerMisconfigured when it cannot be read."""
    if not os.path.isabs(config):
        raise ServerMisconfigured(
            f"nbd-server {pid} runs with the relative config path -C {config}: it cannot "
            "re-read it on reload; start it with an absolute path"
        )
    try:
        return generic_section(read_server_config(as_seen_by(pid, config)))
    except OSError as exc:
        raise ServerMisconfigured(
            f"cannot read nbd-server {pid}'s config {config}: {exc.strerror}"
        ) from exc
    except configparser.Error as exc:
        raise ServerMisconfigured(
            f"cannot parse nbd-server {pid}'s config {config}: {exc.message}"
        ) from exc


def check_main_config(pid: int, config: str, conf_dir: Path) -> None:
    """Raises ServerMisconfigured unless the config of main process `pid` includes
    `conf_dir`, so that the snippets the worker writes there load on a reload."""
    problem = includedir_problem(main_config_generic(pid, config), conf_dir)
    if problem is not None:
        raise ServerMisconfigured(f"nbd-server {pid}'s config {config}: {problem}")
