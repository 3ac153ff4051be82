"""The machine's services as tests and the benchmark reach them, and the files that stand in
for disks. Everything here talks to loopback only."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from aio_pika.abc import AbstractConnection

AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
MYSQL_URL = os.environ.get("TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306")
DISK_SIZE = 16 * 1024 * 1024


def clean_environ(**extra: str) -> dict[str, str]:
    """This process's environment without EXPORT_WORKER_* variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXPORT_WORKER_")}
    return {**env, **extra}


def make_disk(disks_dir: Path, name: str, fill: bytes = b"") -> Path:
    """A sparse file standing in for a block device; `fill` is written at offset 0."""
    path = disks_dir / name
    with path.open("wb") as f:
        f.truncate(DISK_SIZE)
        f.write(fill)
    return path


async def delete_broker_objects(
    amqp: AbstractConnection, queues: list[str], exchanges: list[str]
) -> None:
    # A channel per deletion: a failed one (already gone) closes its channel.
    for queue in queues:
        channel = await amqp.channel()
        with contextlib.suppress(Exception):
            await channel.queue_delete(queue)
        with contextlib.suppress(Exception):
            await channel.close()
    for exchange in exchanges:
        channel = await amqp.channel()
        with contextlib.suppress(Exception):
            await channel.exchange_delete(exchange)
        with contextlib.suppress(Exception):
            await channel.close()
