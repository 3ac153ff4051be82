"""The floor: a bare loop of the worker's shape with none of its logic, as its own process.

    python -m bench.floor --amqp-url URL --database-url mysql://root@127.0.0.1:3306/DB \
        --queue NAME [--prefetch 64] [--pool-size 8]

Consumes the queue (a durable quorum queue, like the worker's request queue) with aio-pika,
runs one primary-key SELECT on a small table through an aiomysql pool, publishes a reply of
the worker's size to reply_to with the correlation_id (persistent, mandatory, publisher
confirms), then acks. Writes "Floor ready" to stderr once it consumes; stops on SIGTERM or
SIGINT. Whatever the worker does beyond this is what the benchmark's ratios measure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import zlib
from collections.abc import Sequence
from urllib.parse import urlsplit

import aio_pika
import aiomysql
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage

TABLE = "bench_floor"
ROWS = 1000


async def _prepare_table(pool: aiomysql.Pool) -> None:
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            f"CREATE TABLE IF NOT EXISTS {TABLE} ("
            " id INT UNSIGNED NOT NULL PRIMARY KEY,"
            " export_name VARCHAR(128) CHARACTER SET ascii NOT NULL,"
            " device_path VARCHAR(1024) CHARACTER SET ascii NOT NULL)"
        )
        await cur.executemany(
            f"INSERT IGNORE INTO {TABLE} (id, export_name, device_path) "  # noqa: S608
            "VALUES (%s, %s, %s)",
            [(i, f"floor-export-{i}", f"/dev/disk/by-id/floor-{i}") for i in range(1, ROWS + 1)],
        )


class Floor:
    def __init__(self, pool: aiomysql.Pool, exchange: AbstractExchange) -> None:
        self._pool = pool
        self._exchange = exchange

    async def handle(self, message: AbstractIncomingMessage) -> None:
        try:
            job = json.loads(message.body)
            key = str(job.get("vm_id", "")) + ":" + str(job.get("disk_unit_number", ""))
        except (ValueError, AttributeError):
            job, key = {}, ""
        row_id = zlib.crc32(key.encode()) % ROWS + 1
        async with self._pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(
                f"SELECT id, export_name, device_path FROM {TABLE} WHERE id = %s",  # noqa: S608
                (row_id,),
            )
            row = await cur.fetchone()
        reply = {
            "job_id": job.get("job_id") if isinstance(job, dict) else None,
            "vm_id": job.get("vm_id") if isinstance(job, dict) else None,
            "disk_unit_number": job.get("disk_unit_number") if isinstance(job, dict) else None,
            "status": "ready",
            "export_name": row[1] if row else None,
            "device_path": row[2] if row else None,
            "reused": True,
            "action": "reused",
            "nbd_host": "127.0.0.1",
            "nbd_port": 10809,
        }
        await self._exchange.publish(
            aio_pika.Message(
                json.dumps(reply).encode(),
                content_type="application/json",
                correlation_id=message.correlation_id,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=message.reply_to or "",
            mandatory=True,
            timeout=10,
        )
        await message.ack()


async def serve(args: argparse.Namespace) -> None:
    url = urlsplit(args.database_url)
    pool = await aiomysql.create_pool(
        host=url.hostname or "127.0.0.1",
        port=url.port or 3306,
        user=url.username or "root",
        password=url.password or "",
        db=url.path.lstrip("/"),
        minsize=1,
        maxsize=args.pool_size,
        autocommit=True,
        charset="utf8mb4",
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await _prepare_table(pool)
        connection = await aio_pika.connect_robust(args.amqp_url, timeout=10)
        async with connection:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            await channel.set_qos(prefetch_count=args.prefetch)
            queue = await channel.declare_queue(
                args.queue, durable=True, arguments={"x-queue-type": "quorum"}
            )
            floor = Floor(pool, channel.default_exchange)
            tag = await queue.consume(floor.handle)
            print(f"Floor ready queue={args.queue} prefetch={args.prefetch}", file=sys.stderr)
            sys.stderr.flush()
            await stop.wait()
            with contextlib.suppress(Exception):
                await queue.cancel(tag)
    finally:
        pool.close()
        await pool.wait_closed()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("--amqp-url", required=True)
    parser.add_argument("--database-url", required=True, help="mysql://user@host:port/db")
    parser.add_argument("--queue", required=True)
    parser.add_argument("--prefetch", type=int, default=64)
    parser.add_argument("--pool-size", type=int, default=8)
    args = parser.parse_args(argv)
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
