"""A real nbd-server for tests, started the way production runs it (daemon, -C, -p),
on a free loopback port, and stopped by the pid it wrote."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from harness.processes import pid_running
from harness.tls_certs import Pki
from worker.nbd.tls_selftest import TLS_PRIORITY

#: Where scripts/install-system-deps.sh --with-old-server unpacks Debian 12's 3.24.
OLD_SERVER_BIN = Path("/var/cache/nbd-export-worker/nbd-server-3.24/bin/nbd-server")
#: Debian's nbd-server source built without the project's patches (install-system-deps.sh
#: --with-test-tools): SIGHUP-safe, but it loses data (WRITE_ZEROES, TRIM).
UNPATCHED_SERVER_BIN = Path("/var/cache/nbd-export-worker/nbd-server-unpatched/nbd-server")
#: The project's build (nbd-server/build.sh), which production and the tests run.
PROJECT_SERVER_BIN = Path("/usr/local/sbin/nbd-server")


def server_binary() -> str:
    """NBD_SERVER_BIN, else the project's build: never whatever `nbd-server` apt put on PATH."""
    found = os.environ.get("NBD_SERVER_BIN") or str(PROJECT_SERVER_BIN)
    if not os.access(found, os.X_OK):
        raise RuntimeError(f"{found} not found: run scripts/bootstrap.sh (nbd-server/build.sh)")
    return found


#: Below Linux's ephemeral range (32768-60999): a port picked now and bound later must not
#: meanwhile become the local port of one of the thousands of short probe connections.
LISTEN_PORTS = range(20000, 32768)


def free_port() -> int:
    for _ in range(100):
        port = random.choice(LISTEN_PORTS)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise OSError("no free port below the ephemeral range")


def wait_for(predicate: object, timeout_s: float, what: str, interval_s: float = 0.01) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(interval_s)
    raise TimeoutError(f"timed out waiting for {what}")


def _accepts(port: int) -> bool:
    try:
        # Before the server listens the connect is refused at once; once it accepts, its
        # greeting comes from a child it forks, which on a loaded machine takes longer than
        # 0.2 s: a short timeout here gave up on it and made the server fork again and again.
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            # The greeting's first bytes, not just an accept: the server is really serving.
            return sock.recv(8) == b"NBDMAGIC"
    except OSError:
        return False


@dataclass
class NbdServerProcess:
    """One nbd-server daemon with its base config, includedir and pid file under `root`."""

    root: Path
    binary: str = field(default_factory=server_binary)
    port: int = field(default_factory=free_port)
    pid: int = 0
    #: As the worker's deployments run it: nobody may list the exports.
    allowlist: bool = False
    #: TLS offered (certfile, keyfile, cacertfile, TLS 1.2+): harness/tls_certs.py's PKI.
    tls: Pki | None = None

    @property
    def config_file(self) -> Path:
        return self.root / "config"

    @property
    def conf_dir(self) -> Path:
        return self.root / "conf.d"

    @property
    def pid_file(self) -> Path:
        return self.root / "nbd-server.pid"

    @property
    def log_file(self) -> Path:
        return self.root / "nbd-server.log"

    def write_base_config(self) -> None:
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        placeholder = self.root / "placeholder.img"
        placeholder.touch()
        os.truncate(placeholder, 1024 * 1024)
        # A server with no export refuses to start, hence the placeholder
        # (nbd-server-facts.md). Absolute paths only.
        self.config_file.write_text(
            "[generic]\n"
            f"    allowlist = {'true' if self.allowlist else 'false'}\n"
            f"    includedir = {self.conf_dir}\n"
            f"    port = {self.port}\n"
            "    listenaddr = 127.0.0.1\n"
            + (
                f"    certfile = {self.tls.server_cert}\n"
                f"    keyfile = {self.tls.server_key}\n"
                f"    cacertfile = {self.tls.ca}\n"
                f"    tlsprio = {TLS_PRIORITY}\n"
                if self.tls is not None
                else ""
            )
            + "[placeholder]\n"
            f"    exportname = {placeholder}\n"
            "    readonly = true\n"
        )

    def start(self) -> int:
        if not self.config_file.exists():
            self.write_base_config()
        self.pid_file.unlink(missing_ok=True)
        with self.log_file.open("ab") as log:
            subprocess.run(
                [self.binary, "-C", str(self.config_file), "-p", str(self.pid_file)],
                check=True,
                stdout=log,
                stderr=log,
                timeout=10,
            )
        wait_for(lambda: self.pid_file.exists() and _accepts(self.port), 10, "nbd-server")
        self.pid = int(self.pid_file.read_text().strip())
        return self.pid

    def stop(self) -> None:
        """SIGTERM to the main process only (it ends its children), by the pid it wrote."""
        if self.pid and pid_running(self.pid):
            os.kill(self.pid, signal.SIGTERM)
            wait_for(lambda: not pid_running(self.pid), 10, f"nbd-server {self.pid} to exit")
        self.pid = 0

    @classmethod
    @contextlib.contextmanager
    def running(
        cls,
        root: Path,
        binary: str | None = None,
        *,
        allowlist: bool = False,
        tls: Pki | None = None,
    ) -> Iterator[NbdServerProcess]:
        """A started server under `root` (created), stopped by its pid on exit."""
        server = cls(root, allowlist=allowlist, tls=tls)
        if binary is not None:
            server.binary = binary
        root.mkdir()
        server.start()
        try:
            yield server
        finally:
            server.stop()

    def knows(self, name: str) -> bool:
        """Whether the server has the export `name` (loaded, maybe refusing us): what
        NBD_OPT_GO answers, which needs no listing."""
        return go_reply(self.port, name) != REP_ERR_UNKNOWN

    def listed(self) -> list[str]:
        """`nbd-client -l` (the server must run with allowlist = true)."""
        out = subprocess.run(
            ["nbd-client", "-l", "127.0.0.1", str(self.port)],
            check=True,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        return [line.strip() for line in out.splitlines()[1:] if line.strip()]


# --- a minimal NBD client: fixed newstyle, NBD_OPT_GO, simple replies ---------------------

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
OPT_GO = 7
REP_ACK = 1
REP_INFO = 3
REP_ERR_POLICY = 0x80000002
REP_ERR_TLS_REQD = 0x80000005
REP_ERR_UNKNOWN = 0x80000006
CMD_READ = 0
CMD_DISC = 2


class NbdError(Exception):
    pass


def go_reply(port: int, name: str, *, source: str | None = None) -> int:
    """The reply type NBD_OPT_GO gets for `name` (REP_ACK when it opened), from `source`."""
    try:
        with NbdConnection(port, name, source=source):
            return REP_ACK
    except NbdRefused as exc:
        return exc.reply_type


class NbdRefused(NbdError):
    def __init__(self, reply_type: int, message: str) -> None:
        super().__init__(f"GO refused: type {reply_type:#x} {message}")
        self.reply_type = reply_type


class NbdConnection:
    """Opens one export with NBD_OPT_GO and reads from it, like the copy tool would, from
    the local address `source` if given (another loopback address: another client)."""

    def __init__(
        self, port: int, name: str, *, timeout_s: float = 10.0, source: str | None = None
    ) -> None:
        self._sock = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout_s, source_address=(source, 0) if source else None
        )
        #: The client's end (address, port), as the server's side sees it.
        self.local: tuple[str, int] = self._sock.getsockname()[:2]
        self._handle = 0
        self.size = self._go(name)

    def _recv(self, n: int) -> bytes:
        # A loop, not MSG_WAITALL: with a timeout set the socket is non-blocking inside
        # Python, and MSG_WAITALL then returns whatever has arrived.
        data = bytearray()
        while len(data) < n:
            chunk = self._sock.recv(n - len(data))
            if not chunk:
                raise NbdError("connection closed by server")
            data += chunk
        return bytes(data)

    def _go(self, name: str) -> int:
        magic, opt_magic, flags = struct.unpack(">QQH", self._recv(18))
        if magic != NBDMAGIC or opt_magic != IHAVEOPT:
            raise NbdError("not a fixed-newstyle NBD server")
        self._sock.sendall(struct.pack(">I", 1 | (flags & 2)))
        encoded = name.encode()
        data = struct.pack(">I", len(encoded)) + encoded + struct.pack(">H", 0)
        self._sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)) + data)
        size = -1
        while True:
            magic, _opt, rtype, length = struct.unpack(">QIII", self._recv(20))
            payload = self._recv(length) if length else b""
            if magic != REPLY_MAGIC:
                raise NbdError("bad option reply magic")
            if rtype & 0x80000000:
                self._sock.close()
                raise NbdRefused(rtype, payload.decode(errors="replace"))
            if rtype == REP_INFO and struct.unpack(">H", payload[:2])[0] == 0:
                size = struct.unpack(">Q", payload[2:10])[0]
            if rtype == REP_ACK:
                return size

    def read(self, offset: int, length: int) -> bytes:
        self._handle += 1
        self._sock.sendall(
            struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, self._handle, offset, length)
        )
        magic, error, handle = struct.unpack(">IIQ", self._recv(16))
        if magic != SIMPLE_REPLY_MAGIC or handle != self._handle:
            raise NbdError("bad reply")
        if error:
            raise NbdError(f"read error {error}")
        return self._recv(length)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
        self._sock.close()

    def __enter__(self) -> NbdConnection:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
