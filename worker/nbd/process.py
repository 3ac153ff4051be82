"""nbd-server's main process: find it, check it, pass it through its gates, signal it.

A SIGHUP that reaches a per-connection child kills a live migration (nbd-server-facts.md,
"Processes and signals"), so the only signal this module sends goes to one pid read from
the pid file and checked just before, through a pidfd so the pid cannot be recycled between
the check and the signal. Never pkill, never a process group. Also the reload lock.

Checked: a live session leader running nbd-server (check_main_process). Its gates, once
per pid (a restart may bring another binary): its includedir, its binary's version (>= 3.25:
SIGHUP-safe) and the data-path self-test on that binary (no version is free of such bugs).

Over 400 lines (budget 410) on purpose: finding, vetting and signalling the one process
that may be signalled stay together, with the reload lock that orders them.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import fcntl
import logging
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.errors import ServerMisconfigured, ServerUnavailable, UnsafeServer, UnsupportedServer
from worker.nbd.command import run_with_deadline
from worker.nbd.main_config import check_main_config, config_from_cmdline
from worker.nbd.selftest import SelfTestResult

log = logging.getLogger(__name__)

#: Runs the data-path self-test on a binary (worker.nbd.selftest.run_self_test).
SelfTest = Callable[[str], Coroutine[Any, Any, SelfTestResult]]

#: 3.24 corrupts its heap on SIGHUP (upstream issue #143, fixed in 3.25 by PR #142).
MIN_SERVER_VERSION = (3, 25)
#: How long a self-test that could not run is not tried again (jobs get its reason).
UNRUN_RETRY_S = 10.0
_VERSION_RE = re.compile(r"nbd-server version (\d+)\.(\d+)(?:\.(\d+))?")


@dataclass(frozen=True)
class ProcStat:
    state: str
    ppid: int
    session: int
    #: User plus system CPU time, in clock ticks (children_cpu_ticks: its reaped children's).
    cpu_ticks: int
    pgrp: int = 0
    children_cpu_ticks: int = 0
    start_ticks: int = 0  # after boot (0: absent): with the pid, it names one process


def parse_stat(text: str) -> ProcStat:
    """Parses /proc/PID/stat; the command name may itself contain spaces and parentheses."""
    fields = text[text.rindex(")") + 2 :].split()
    # After "(comm)": state ppid pgrp session tty_nr tpgid flags minflt cminflt majflt
    # cmajflt utime stime cutime cstime priority nice num_threads itrealvalue starttime ...
    return ProcStat(
        state=fields[0],
        ppid=int(fields[1]),
        session=int(fields[3]),
        cpu_ticks=int(fields[11]) + int(fields[12]),
        pgrp=int(fields[2]),
        children_cpu_ticks=int(fields[13]) + int(fields[14]),
        start_ticks=int(fields[19]) if len(fields) > 19 else 0,
    )


def parse_version(text: str) -> tuple[int, int, int]:
    """`This is nbd-server version 3.26.1` -> (3, 26, 1). Raises ValueError if absent."""
    match = _VERSION_RE.search(text)
    if match is None:
        raise ValueError(f"no nbd-server version in {text.strip()[:200]!r}")
    return (int(match[1]), int(match[2]), int(match[3] or 0))


def format_version(version: tuple[int, ...]) -> str:
    return ".".join(str(part) for part in version)


def read_pid_file(pid_file: Path) -> int:
    try:
        text = pid_file.read_text().strip()
    except OSError as exc:
        raise ServerUnavailable(
            f"cannot read nbd-server pid file {pid_file}: {exc.strerror}"
        ) from exc
    # pid 1 is allowed: in a container sharing the server's PID namespace, the server is
    # often its first process. check_main_process still has to accept it before a signal.
    if not text.isdigit() or int(text) < 1:
        raise ServerUnavailable(f"nbd-server pid file {pid_file} holds no valid pid")
    return int(text)


def file_credentials(pid: int) -> tuple[int, set[int]]:
    """The file-system uid and the gids (primary and supplementary) a process opens files
    with, from /proc/PID/status. Raises ServerUnavailable."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError as exc:
        raise ServerUnavailable(f"nbd-server process {pid} is not running") from exc
    fields = {key: value.split() for key, _, value in (line.partition(":") for line in lines)}
    try:
        uid = int(fields["Uid"][3])
        gids = {int(fields["Gid"][3]), *(int(g) for g in fields.get("Groups", []))}
    except (KeyError, IndexError, ValueError) as exc:
        raise ServerUnavailable(f"cannot read the credentials of process {pid}") from exc
    return uid, gids


def check_main_process(pid: int, pinned_config: Path | None) -> str:
    """Raises ServerUnavailable unless `pid` is a live nbd-server main process; returns the
    config file on its command line. Raises ServerMisconfigured when `pinned_config` is set
    and the process runs with another.

    The main process is a session leader; its per-connection children share its session and
    command line, so session == pid is what tells them apart (nbd-server-facts.md).
    """
    proc = Path(f"/proc/{pid}")
    try:
        stat = parse_stat((proc / "stat").read_text())
        argv = (proc / "cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    except (OSError, ValueError, IndexError) as exc:
        raise ServerUnavailable(f"nbd-server main process {pid} is not running") from exc
    if stat.state in ("Z", "X"):
        raise ServerUnavailable(f"nbd-server main process {pid} has exited (state {stat.state})")
    if stat.session != pid:
        raise ServerUnavailable(
            f"process {pid} from the pid file is not a session leader: not nbd-server's "
            "main process; refusing to signal it"
        )
    args = [a.decode(errors="replace") for a in argv]
    if not args or os.path.basename(args[0]) != "nbd-server":
        raise ServerUnavailable(f"process {pid} from the pid file is not nbd-server")
    config = config_from_cmdline(args)
    if pinned_config is not None and config != str(pinned_config):
        raise ServerMisconfigured(
            f"nbd-server {pid} runs with config {config}, but EXPORT_WORKER_NBD_CONFIG_FILE "
            f"pins {pinned_config}; refusing to signal it: start it with -C {pinned_config}, "
            "or unset the setting"
        )
    return config


class MainProcess:
    """The nbd-server main process named by the pid file, whose config includes `conf_dir`.

    It passes its gates once per pid (its config's includedir, version, then the data-path
    self-test, when one is given) before the first SIGHUP and before the first export is
    handed out, not only at start-up; the includedir is read again before every SIGHUP.
    """

    def __init__(
        self,
        pid_file: Path,
        conf_dir: Path,
        *,
        pinned_config: Path | None = None,
        version_timeout_s: float,
        self_test: SelfTest | None = None,
        accept_failed_self_test: bool = False,
        on_self_test: Callable[[int, SelfTestResult], None] | None = None,
    ) -> None:
        self._pid_file = pid_file
        self._conf_dir = conf_dir
        self._config_file = pinned_config
        #: The pid whose config was last found to include conf_dir.
        self._config_ok: int | None = None
        #: The pid that last passed every gate of pass_gates().
        self._passed: int | None = None
        self._version_timeout_s = version_timeout_s
        self._self_test = self_test
        self._accept_failed = accept_failed_self_test
        self._on_self_test = on_self_test
        self._versions: dict[int, tuple[int, int, int]] = {}
        self._verdicts: dict[int, SelfTestResult] = {}
        self._testing: tuple[int, asyncio.Task[SelfTestResult]] | None = None
        #: A test that could not run, kept briefly: every job must not start one anew.
        self._unrun: tuple[int, float, ServerUnavailable] | None = None
        self._pid_seen: tuple[tuple[int, int, int], int] | None = None

    def main_pid_and_config(self) -> tuple[int, str]:
        """The pid file's pid, checked now (check_main_process), and the config file it runs
        with. Raises ServerUnavailable (ServerMisconfigured: not the pinned config)."""
        pid = read_pid_file(self._pid_file)
        return pid, check_main_process(pid, self._config_file)

    def main_pid(self) -> int:
        """The pid file's pid, checked now (check_main_process). Raises ServerUnavailable."""
        return self.main_pid_and_config()[0]

    def existing_pid(self) -> int:
        """The pid file's pid if a process with it exists, not checked: two stats, for the
        reuse path. Enough to tell a restart (a new pid); every signal still goes through
        the full checks. Raises ServerUnavailable."""
        try:
            st = os.stat(self._pid_file)
        except OSError as exc:
            raise ServerUnavailable(f"cannot read nbd-server pid file {self._pid_file}") from exc
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._pid_seen is None or self._pid_seen[0] != key:
            self._pid_seen = (key, read_pid_file(self._pid_file))
        pid = self._pid_seen[1]
        if not os.path.exists(f"/proc/{pid}"):
            raise ServerUnavailable(f"nbd-server main process {pid} is not running")
        return pid

    def _check_config(self, pid: int, config: str, *, fresh: bool) -> None:
        """Raises ServerMisconfigured unless `config` includes the snippet directory. Read
        once per pid, and afresh before a SIGHUP (the one moment it must be right)."""
        if not fresh and self._config_ok == pid:
            return
        self._config_ok = None
        try:
            check_main_config(pid, config, self._conf_dir)
        except ServerMisconfigured:
            # A server that exited meanwhile (its /proc/PID/root gone) is unavailable, and
            # retried, not misconfigured.
            check_main_process(pid, self._config_file)
            raise
        self._config_ok = pid

    def is_main_process(self, pid: int) -> bool:
        try:
            check_main_process(pid, self._config_file)
        except ServerUnavailable:
            return False
        return True

    async def check_version(self) -> tuple[int, int, int]:
        """The running main process's version; raises UnsupportedServer below 3.25."""
        return await self._supported_version(self.main_pid())

    async def gated_main_pid(self) -> int:
        """main_pid(), once it passed its gates (cached per pid). Raises ServerUnavailable,
        UnsupportedServer or UnsafeServer."""
        pid = self.main_pid()
        await self.pass_gates(pid)
        return pid

    async def pass_gates(self, pid: int) -> None:
        """Raises ServerMisconfigured/UnsupportedServer/UnsafeServer unless `pid` passed the
        config, version and self-test gates; dict lookups once it has. A pid seen for the
        first time is checked (check_main_process) first: its binary is about to be run."""
        if self._passed == pid and self._config_ok == pid:
            return  # every gate passed by this pid already: the reuse path's case
        if pid not in self._versions or self._config_ok != pid:
            self._check_config(pid, check_main_process(pid, self._config_file), fresh=False)
        await self._binary_gates(pid)
        self._passed = pid

    async def _binary_gates(self, pid: int) -> tuple[tuple[int, int, int], SelfTestResult | None]:
        version = await self._supported_version(pid)
        if self._self_test is None:
            return version, None
        verdict = self._verdicts.get(pid)
        if verdict is None:
            verdict = await self._single_self_test(pid)
        self._judge(verdict)
        return version, verdict

    async def _single_self_test(self, pid: int) -> SelfTestResult:
        """One self-test per pid, however many jobs are waiting for it. A test that could not
        be run (ServerUnavailable) is not a verdict: it is not kept, and the next caller
        tries again."""
        assert self._self_test is not None
        unrun = self._unrun
        if unrun is not None and unrun[0] == pid and time.monotonic() < unrun[1]:
            raise unrun[2]
        if self._testing is None or self._testing[0] != pid or self._testing[1].cancelled():
            # A context of its own: its log lines must not carry the fields of whichever job
            # happened to start it.
            task = asyncio.create_task(
                self._self_test(f"/proc/{pid}/exe"), context=contextvars.Context()
            )
            self._testing = (pid, task)
        testing = self._testing
        try:
            # Shielded: one waiter's cancellation must not cancel the test the others await.
            verdict = await asyncio.shield(testing[1])
        except Exception as exc:  # ServerUnavailable: not run; anything else: a bug, no verdict
            if self._testing is testing:
                self._testing = None
                if isinstance(exc, ServerUnavailable):
                    self._unrun = (pid, time.monotonic() + UNRUN_RETRY_S, exc)
            raise
        # Kept only while this is the newest pid tested: an older test that ends late must
        # not replace a newer verdict (nor the gauge).
        if pid not in self._verdicts and self._testing is testing:
            self._verdicts = {pid: verdict}
            if verdict.ok:
                log.info("nbd-server data path verified pid=%d: %s", pid, verdict.summary())
            elif self._accept_failed:
                log.warning(
                    "nbd-server pid=%d is used although it FAILED the data-path self-test, "
                    "because EXPORT_WORKER_ACCEPT_FAILED_SELF_TEST is set: %s",
                    pid,
                    verdict.summary(),
                )
            else:
                log.error("Refusing nbd-server pid=%d: %s", pid, verdict.summary())
            if self._on_self_test is not None:
                self._on_self_test(pid, verdict)
        return verdict

    def _judge(self, verdict: SelfTestResult) -> None:
        if not verdict.ok and not self._accept_failed:
            raise UnsafeServer(verdict.summary())

    async def _supported_version(self, pid: int) -> tuple[int, int, int]:
        version = self._versions.get(pid)
        if version is None:
            version = await self._read_version(pid)
            self._versions = {pid: version}  # only the current pid matters
        if version[:2] < MIN_SERVER_VERSION:
            raise UnsupportedServer(
                f"nbd-server {format_version(version)} (pid {pid}) is too old: versions before "
                f"{format_version(MIN_SERVER_VERSION)} corrupt their heap on SIGHUP (upstream "
                "issue #143), and the worker adds exports by SIGHUP. Install the project's "
                "nbd-server build (nbd-server/build.sh)."
            )
        return version

    async def _read_version(self, pid: int) -> tuple[int, int, int]:
        # /proc/PID/exe: the binary that is running, not whatever is on PATH now.
        exe = f"/proc/{pid}/exe"
        try:
            done = await run_with_deadline([exe, "-V"], self._version_timeout_s)
        except TimeoutError:  # before OSError: TimeoutError is one
            raise ServerUnavailable(f"{exe} -V did not answer in time") from None
        except OSError as exc:
            raise ServerUnavailable(f"cannot run {exe} -V: {exc.strerror}") from exc
        try:
            # Some versions print it on stdout, others on stderr.
            return parse_version((done.stdout + done.stderr).decode(errors="replace"))
        except ValueError as exc:
            raise ServerUnavailable(f"cannot read the version of nbd-server {pid}: {exc}") from exc

    async def send_reload(self) -> int:
        """SIGHUPs the main process only, checked now and through its gates; returns its pid.

        Raises ServerUnavailable (UnsupportedServer/UnsafeServer when it must not be used).
        """
        pid = read_pid_file(self._pid_file)
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as exc:
            raise ServerUnavailable(f"nbd-server main process {pid} is not running") from exc
        try:
            # Checked after the pidfd is open: the fd pins this very process, so the pid
            # cannot be reused by another process between the checks and the signal.
            config = check_main_process(pid, self._config_file)
            await self._binary_gates(pid)  # may run the self-test: seconds
            # Read afresh just before the signal, after any wait above.
            self._check_config(pid, config, fresh=True)
            signal.pidfd_send_signal(pidfd, signal.SIGHUP)
        except ProcessLookupError as exc:
            raise ServerUnavailable(f"nbd-server main process {pid} exited") from exc
        finally:
            os.close(pidfd)
        return pid


class ReloadLock:
    """Serializes config edits and SIGHUPs: an asyncio.Lock within the process, and an
    flock on a file in the config directory across worker processes on one host."""

    def __init__(self, lock_file: Path, *, poll_interval_s: float = 0.005) -> None:
        self._lock_file = lock_file
        self._poll_interval_s = poll_interval_s
        self._local = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def hold(self, timeout_s: float) -> AsyncIterator[float]:
        """Holds both locks; yields the seconds spent waiting. Raises TimeoutError."""
        started = time.monotonic()
        async with asyncio.timeout(timeout_s):
            await self._local.acquire()
        try:
            fd = os.open(self._lock_file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                deadline = started + timeout_s
                while True:
                    try:
                        # Non-blocking, polled: a blocking flock in a thread could not be
                        # cancelled and would leave the lock taken after a timeout.
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() >= deadline:
                            raise TimeoutError from None
                        await asyncio.sleep(self._poll_interval_s)
                try:
                    yield time.monotonic() - started
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
        finally:
            self._local.release()
