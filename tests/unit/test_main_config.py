"""nbd-server's main config as the worker judges it (worker/nbd/main_config.py), and when
MainProcess reads it: once per pid on the job path, afresh just before every SIGHUP."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from worker.errors import ServerMisconfigured, ServerUnavailable, UnsafeServer
from worker.metrics import build_metrics
from worker.nbd import authfiles as authfiles_module
from worker.nbd import process as process_module
from worker.nbd.files import make_worker_dir
from worker.nbd.main_config import (
    check_main_config,
    includedir_problem,
    main_config_generic,
    read_server_config,
    resolve_in_root,
)
from worker.nbd.process import MainProcess, SelfTest
from worker.nbd.selftest import SelfTestResult
from worker.nbd.server import NbdServer
from worker.settings import Settings

CONF_DIR = Path("/etc/nbd-server/conf.d")


def config(tmp_path: Path, generic: str) -> Path:
    path = tmp_path / "config"
    path.write_text(f"[generic]\n{generic}\n[placeholder]\n    exportname = /dev/null\n")
    return path


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("    includedir = /etc/nbd-server/conf.d", None),
        ("    includedir = /etc/nbd-server/conf.d/", None),
        ("    allowlist = false", "it has no includedir"),
        ("    includedir = conf.d", "is relative"),
        ("    includedir = /srv/other.d", "its includedir is /srv/other.d, but the worker"),
        # GKeyFile: keys are case-sensitive, and a `#` after a value is part of it.
        ("    IncludeDir = /etc/nbd-server/conf.d", "it has no includedir"),
        ("    includedir = /etc/nbd-server/conf.d  # ours", "its includedir is /etc/nbd"),
    ],
)
def test_includedir_must_be_the_snippet_directory(
    tmp_path: Path, line: str, problem: str | None
) -> None:
    generic = read_server_config(config(tmp_path, line))["generic"]
    found = includedir_problem(generic, CONF_DIR)
    if problem is None:
        assert found is None
    else:
        assert found is not None
        assert problem in found


def test_the_config_is_read_as_the_server_reads_it(tmp_path: Path) -> None:
    # Through /proc/PID/root: this process stands in for the server.
    path = config(tmp_path, f"    includedir = {tmp_path / 'conf.d'}")
    check_main_config(os.getpid(), str(path), tmp_path / "conf.d")
    with pytest.raises(ServerMisconfigured, match="its includedir is"):
        check_main_config(os.getpid(), str(path), CONF_DIR)
    with pytest.raises(ServerMisconfigured, match="relative config path -C config"):
        main_config_generic(os.getpid(), "config")
    with pytest.raises(ServerMisconfigured, match="cannot read nbd-server"):
        main_config_generic(os.getpid(), str(tmp_path / "missing"))


def test_symlinks_are_followed_inside_the_servers_root(tmp_path: Path) -> None:
    """A server in a container of its own: its /etc/nbd-server/config may be a symlink to
    an absolute path, which must be looked up in its root, not the worker's."""
    root = tmp_path / "root"
    (root / "etc/nbd-server").mkdir(parents=True)
    (root / "srv/nbd").mkdir(parents=True)
    (root / "srv/nbd/config").write_text("[generic]\n")
    (root / "etc/nbd-server/config").symlink_to("/srv/nbd/config")  # absolute, in its root
    (root / "etc/current").symlink_to("nbd-server")  # relative
    for path in ("/etc/nbd-server/config", "/etc/current/config", "/etc/../etc/current/config"):
        assert resolve_in_root(root, path) == root / "srv/nbd/config"
    (root / "loop").symlink_to("/loop")
    with pytest.raises(OSError, match="Too many levels"):
        resolve_in_root(root, "/loop/config")
    # What a plain join would read instead: the worker's own /srv/nbd/config.
    assert (root / "etc/nbd-server/config").resolve() == Path("/srv/nbd/config")


@pytest.fixture
def checks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Stands in for the /proc checks of one function each: records every config read."""
    calls: list[str] = []

    def config_checked(pid: int, config: str, conf_dir: Path) -> None:
        calls.append(f"config {config}")

    monkeypatch.setattr(process_module, "check_main_process", lambda pid, pinned: "/cfg")
    monkeypatch.setattr(process_module, "check_main_config", config_checked)
    return calls


async def test_the_job_path_reads_the_config_once_per_pid(
    tmp_path: Path, checks: list[str]
) -> None:
    process = MainProcess(tmp_path / "pid", CONF_DIR, version_timeout_s=1)
    process._versions = {4242: (3, 26, 1)}  # as read from /proc/PID/exe -V
    for _ in range(5):
        await process.pass_gates(4242)
    assert checks == ["config /cfg"]
    process._versions[4343] = (3, 26, 1)  # a restart: another pid, read again
    await process.pass_gates(4343)
    assert checks == ["config /cfg", "config /cfg"]


def counted_self_test(checks: list[str], *problems: str) -> SelfTest:
    """A self-test that notes each run in `checks` and finds `problems`."""

    async def self_test(binary: str) -> SelfTestResult:
        checks.append("self-test")
        return SelfTestResult(binary, problems)

    return self_test


async def test_a_pid_through_its_gates_passes_until_its_config_is_in_doubt(
    tmp_path: Path, checks: list[str]
) -> None:
    self_test = counted_self_test(checks)
    process = MainProcess(tmp_path / "pid", CONF_DIR, version_timeout_s=1, self_test=self_test)
    process._versions = {4242: (3, 26, 1)}
    for _ in range(3):
        await process.pass_gates(4242)
    assert checks == ["config /cfg", "self-test"]
    process._config_ok = None  # as after a fresh read (before a SIGHUP) that failed
    await process.pass_gates(4242)
    assert checks == ["config /cfg", "self-test", "config /cfg"]


async def test_a_pid_that_failed_its_self_test_is_refused_at_every_job(
    tmp_path: Path, checks: list[str]
) -> None:
    failing = counted_self_test(checks, "a WRITE_ZEROES left old data")
    process = MainProcess(tmp_path / "pid", CONF_DIR, version_timeout_s=1, self_test=failing)
    process._versions = {4242: (3, 26, 1)}
    for _ in range(3):
        with pytest.raises(UnsafeServer, match="WRITE_ZEROES"):
            await process.pass_gates(4242)
    assert checks == ["config /cfg", "self-test"]  # tested once, refused every time


async def test_every_sighup_reads_the_config_afresh_after_the_self_test(
    tmp_path: Path, checks: list[str]
) -> None:
    self_test = counted_self_test(checks)
    # A process that ignores SIGHUP stands in for the server's main process.
    child = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGHUP, "
         "signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"ready\n"
        (tmp_path / "pid").write_text(str(child.pid))
        process = MainProcess(tmp_path / "pid", CONF_DIR, version_timeout_s=1,
                              self_test=self_test)  # fmt: skip
        process._versions = {child.pid: (3, 26, 1)}
        # A pid not through its gates yet: its self-test (seconds) runs first, the config read
        # follows.
        await process.send_reload()
        await process.send_reload()
        assert checks == ["self-test", "config /cfg", "config /cfg"]
        assert child.poll() is None
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()


async def test_a_server_gone_while_its_config_is_read_is_unavailable_not_misconfigured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = iter(["/cfg"])

    def main_process(pid: int, pinned: Path | None) -> str:
        for config in answers:
            return config
        raise ServerUnavailable(f"nbd-server main process {pid} is not running")

    def config_gone(pid: int, config: str, conf_dir: Path) -> None:
        raise ServerMisconfigured(f"cannot read nbd-server {pid}'s config {config}")

    monkeypatch.setattr(process_module, "check_main_process", main_process)
    monkeypatch.setattr(process_module, "check_main_config", config_gone)
    process = MainProcess(tmp_path / "pid", CONF_DIR, version_timeout_s=1)
    with pytest.raises(ServerUnavailable) as raised:
        await process.pass_gates(4242)
    assert not isinstance(raised.value, ServerMisconfigured)
    assert raised.value.retryable


def test_a_missing_authfile_directory_is_judged_by_what_run_makes_it_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the first run the directory may not exist: the server's user (not root here)
    must be able to enter the directories above it, not the missing one itself."""
    monkeypatch.setattr(authfiles_module, "file_credentials", lambda pid: (4321, {4321}))

    def problem(auth_dir: Path) -> str | None:
        server = NbdServer(Settings(node_id="t", auth_dir=auth_dir), build_metrics("t"))
        monkeypatch.setattr(server.process, "main_pid", lambda: 4242)
        return server.auth_dir_problem()

    assert problem(Path("/nonexistent-nbd-export-worker/state/auth")) is None
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    assert problem(closed / "auth") is not None


def test_run_makes_every_missing_directory_enterable(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        make_worker_dir(tmp_path / "a" / "b" / "auth")
    finally:
        os.umask(old)
    for part in ("a", "a/b", "a/b/auth"):
        assert stat.S_IMODE((tmp_path / part).stat().st_mode) == 0o755
