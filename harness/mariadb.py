"""A private MariaDB server for tests that need one configured otherwise than the
machine's (TLS): Debian's mariadbd on a free loopback port with its own datadir, started
and stopped by its pid."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from harness.nbd import free_port, wait_for
from harness.processes import pid_running
from harness.tls_certs import Pki


@dataclass
class MariaDbInstance:
    root: Path
    tls: Pki | None = None
    port: int = 0
    pid: int = 0
    #: More server options (harness/clusters/galera.py: a Galera node's).
    extra_args: list[str] = field(default_factory=list)
    #: The account mariadbd runs as. A Galera node runs as mysql, as deployed: its rsync
    #: state transfer daemon, started by root, would write as nobody.
    user: str = "root"

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    def _argv(self) -> list[str]:
        argv = [
            "/usr/sbin/mariadbd",
            "--no-defaults",
            f"--datadir={self.datadir}",
            f"--port={self.port}",
            "--bind-address=127.0.0.1",
            f"--socket={self.root / 'mysqld.sock'}",
            f"--pid-file={self.root / 'mysqld.pid'}",
            f"--log-error={self.root / 'error.log'}",
            f"--user={self.user}",
            "--innodb-buffer-pool-size=16M",
            "--skip-log-bin",
            *self.extra_args,
        ]
        if self.tls is not None:
            argv += [
                f"--ssl-ca={self.tls.ca}",
                f"--ssl-cert={self.tls.server_cert}",
                f"--ssl-key={self.tls.server_key}",
                "--tls-version=TLSv1.2,TLSv1.3",
            ]
        return argv

    def start(self, *, bootstrap: bool = False) -> None:
        """Starts the server, creating its datadir the first time; `bootstrap`: a Galera
        node that forms a new cluster (--wsrep-new-cluster)."""
        if not self.datadir.exists():
            self._install()
        self.port = self.port or free_port()
        argv = self._argv() + (["--wsrep-new-cluster"] if bootstrap else [])
        # A process group of its own: a Galera node's state transfer scripts go with it.
        proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        self.pid = proc.pid
        wait_for(lambda: self._answers(proc), 120, f"mariadbd on port {self.port}", 0.1)

    def _install(self) -> None:
        self.datadir.mkdir(parents=True)
        if self.user != "root":
            shutil.chown(self.root, self.user, self.user)
            shutil.chown(self.datadir, self.user, self.user)
        subprocess.run(
            [
                "mariadb-install-db", "--no-defaults", f"--datadir={self.datadir}",
                f"--user={self.user}", "--auth-root-authentication-method=normal", "--skip-test-db",
            ],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip

    def _answers(self, proc: subprocess.Popen[bytes]) -> bool:
        if proc.poll() is not None:
            log = (self.root / "error.log").read_text(errors="replace")[-2000:]
            raise AssertionError(f"mariadbd exited {proc.returncode}: {log}")
        return self.sql("SELECT 1", check=False).returncode == 0

    def sql(self, statement: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
        """As root over the instance's own socket (set-up only)."""
        return subprocess.run(
            ["mariadb", f"--socket={self.root / 'mysqld.sock'}", "-uroot", "-e", statement],
            check=check, capture_output=True, text=True, timeout=30,
        )  # fmt: skip

    def stop(self) -> None:
        if self.pid and pid_running(self.pid):
            os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + 60
            while pid_running(self.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if pid_running(self.pid):
                os.kill(self.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
        self.pid = 0


@contextlib.contextmanager
def running_mariadb(root: Path, tls: Pki | None = None) -> Iterator[MariaDbInstance]:
    instance = MariaDbInstance(root, tls)
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()
