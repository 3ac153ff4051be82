"""The TLS close self-test: does this nbd-server binary let go of a TLS client that closes?

nbd-server 3.26.1 busy-loops a per-connection child at ~100% CPU when a TLS peer closes
its session cleanly (close_notify) without NBD_CMD_DISC (`readit_tls` loops on a 0 return;
fixed in 3.27.0, patch 0003 here): every copy tool that ends that way leaves a core
spinning until the server restarts. A private instance of the binary, with the server's
own TLS files, is opened and closed that way a few times; then its children's CPU time
must stand still. Raises ServerUnavailable when the test cannot be run.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from worker.errors import ServerUnavailable
from worker.nbd.process import parse_stat
from worker.nbd.selftest import PREFIX, PrivateServer, Scratch, SelfTestResult
from worker.nbd.wire import NbdTls, open_export

EXPORT = "tls-close-test"
CLOSES = 3
#: How long after the closes the children are watched, and the CPU share that is a spin.
WATCH_S = 1.0
SPINNING_SHARE = 0.3
#: GnuTLS priorities, as the sample base configs give them: TLS 1.2 and newer only (the
#: documented default is not applied, and 1.0/1.1 were accepted: nbd-server-facts.md).
TLS_PRIORITY = "NORMAL:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2"


#: The [generic] keys of a server's TLS files, in ServerTlsFiles' order.
TLS_FILE_KEYS = ("certfile", "keyfile", "cacertfile")


@dataclass(frozen=True)
class ServerTlsFiles:
    """The [generic] TLS files of the server under test (its own, so that the worker's
    client certificate and CA are tried as in production)."""

    certfile: Path
    keyfile: Path
    cacertfile: Path


def children_cpu_s(pid: int) -> tuple[int, float]:
    """How many children `pid` has, and their CPU time (user + system) in seconds."""
    count, total = 0, 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = parse_stat(Path(entry.path, "stat").read_text())
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
        if stat.ppid == pid:
            count += 1
            total += stat.cpu_ticks
    return count, total / os.sysconf("SC_CLK_TCK")


async def run_tls_close_test(
    binary: str, server_files: ServerTlsFiles, client: NbdTls, *, timeout_s: float = 30.0
) -> SelfTestResult:
    """Closes TLS sessions cleanly without NBD_CMD_DISC on a private instance of `binary`;
    the verdict fails when a child is left spinning."""
    started = time.monotonic()
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix=PREFIX) as workdir:
        scratch = Scratch(EXPORT, Path(workdir) / "scratch.img", False, "")
        server = PrivateServer(
            binary,
            Path(workdir),
            [scratch],
            generic=(
                f"certfile = {server_files.certfile}",
                f"keyfile = {server_files.keyfile}",
                f"cacertfile = {server_files.cacertfile}",
                f"tlsprio = {TLS_PRIORITY}",
            ),
            export_options=("force_tls = true",),
        )
        try:
            async with asyncio.timeout(timeout_s):
                await server.start()
                # The private instance's certificate names the production server, which
                # is what the client context checks.
                for _ in range(CLOSES):
                    async with open_export(
                        "127.0.0.1", server.port, EXPORT, timeout_s, tls=client, disconnect=False
                    ) as export:
                        await export.read(0, 4096)
                await asyncio.sleep(0.3)  # the children see the close
                pid = server.pid
                if pid is None:
                    raise ServerUnavailable(f"the private instance of {binary} exited")
                _, before = await asyncio.to_thread(children_cpu_s, pid)
                await asyncio.sleep(WATCH_S)
                left, after = await asyncio.to_thread(children_cpu_s, pid)
                if left and after - before > SPINNING_SHARE * WATCH_S:
                    failures.append(
                        f"{left} child(ren) spun at {100 * (after - before) / WATCH_S:.0f}% CPU "
                        "after TLS clients closed cleanly without NBD_CMD_DISC (3.26.1's "
                        "readit_tls loop, fixed in 3.27.0 and by patch 0003): every such copy "
                        "would leave a core busy until a restart"
                    )
        except TimeoutError:
            raise ServerUnavailable(
                f"the TLS close test of {binary} did not complete within {timeout_s:g} s"
            ) from None
        except OSError as exc:
            raise ServerUnavailable(f"the TLS close test of {binary} could not run: {exc}") from exc
        finally:
            await server.stop()
    return SelfTestResult(binary, tuple(failures), (), time.monotonic() - started)
