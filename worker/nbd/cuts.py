"""Cutting one connection of an export, and nothing else: SIGTERM to the one per-connection
child that serves it, verified just before.

Why this mechanism: nbd-server forks a child per connection; SIGTERM to that child ends that
connection only (the client sees EOF; the main process and every other child carry on:
nbd-server-facts.md, "Processes and signals"). Destroying the client's TCP socket (`ss -K`)
would do the same but needs CAP_NET_ADMIN and a kernel with CONFIG_INET_DIAG_DESTROY; a
signal needs only what the worker already has to SIGHUP the main process: the same user as
nbd-server (or CAP_KILL), and, in a container, the server's PID namespace.

Why it is safe: the child is checked right before the signal to be the same process the
live view sampled (pid and start time: a pid can be reused once its process exits), a child
of the verified main process (never the main process, never another server's process),
and to hold the export's device open; the signal goes through a pidfd opened before the
check, so the pid cannot be recycled between the check and the signal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal

from worker.nbd.connections import DeviceKey, sample_child

log = logging.getLogger(__name__)


def end_connection(main_pid: int, pid: int, start_ticks: int, device: DeviceKey) -> bool:
    """SIGTERM to child `pid` if it is still the main process's child that started at
    `start_ticks` and holds `device`; whether it was sent."""
    if pid == main_pid or pid <= 1:
        return False
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return False  # gone already
    try:
        child = sample_child(pid, main_pid)
        if (
            child is None
            or child.zombie
            or child.start_ticks != start_ticks
            or device not in child.devices
        ):
            log.warning(
                "Not cutting pid=%d: no longer the connection sampled (main pid=%d)",
                pid,
                main_pid,
            )
            return False
        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
    except ProcessLookupError:
        return False
    else:
        return True
    finally:
        with contextlib.suppress(OSError):
            os.close(pidfd)
