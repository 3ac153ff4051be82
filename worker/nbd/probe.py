"""Asks the running server which exports it lists, with a deadline.

`nbd-client -l` has no timeout of its own and hangs forever against a server that accepts
but never answers (nbd-server-facts.md), so every probe is killed at its deadline.
"""

from __future__ import annotations

from worker.errors import ProbeTimeout, ServerUnavailable
from worker.nbd.command import run_with_deadline

NEGOTIATION_PREFIX = "Negotiation:"


def parse_listing(output: str) -> frozenset[str]:
    """Export names from `nbd-client -l` output: one per line after the negotiation line.

    Names are matched whole, never by substring: `...-disk1` must not match `...-disk10`.
    """
    names = set()
    for line in output.splitlines():
        name = line.strip()
        if name and not name.startswith(NEGOTIATION_PREFIX):
            names.add(name)
    return frozenset(names)


async def list_exports(client_bin: str, host: str, port: int, timeout_s: float) -> frozenset[str]:
    """Export names the server lists now. Raises ServerUnavailable (retryable), ProbeTimeout
    when the server accepts but does not answer in time."""
    try:
        done = await run_with_deadline([client_bin, "-l", host, str(port)], timeout_s)
    except TimeoutError:  # before OSError: TimeoutError is one
        raise ProbeTimeout(
            f"nbd-server at {host}:{port} did not answer a listing within {timeout_s:g} s"
        ) from None
    except OSError as exc:
        raise ServerUnavailable(f"cannot run {client_bin}: {exc.strerror}") from exc
    if done.returncode != 0:
        reason = (done.stderr or done.stdout).decode(errors="replace").strip().splitlines()
        raise ServerUnavailable(
            f"listing exports of {host}:{port} failed: {reason[-1] if reason else done.returncode}"
        )
    return parse_listing(done.stdout.decode(errors="replace"))
