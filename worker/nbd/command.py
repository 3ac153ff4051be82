"""Runs one external program as an async subprocess, never through a shell, and kills it
at its deadline: nbd-client -l, for one, has no timeout of its own."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


@dataclass(frozen=True)
class Completed:
    returncode: int
    stdout: bytes
    stderr: bytes


async def run_with_deadline(argv: list[str], timeout_s: float) -> Completed:
    """Raises OSError when the program cannot start, TimeoutError at the deadline (the
    process is then killed and reaped); cancellation kills it too."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout_s)
    except (TimeoutError, asyncio.CancelledError):
        proc.kill()
        await proc.wait()
        raise
    return Completed(proc.returncode or 0, stdout, stderr)
