"""Leases, expiry, release modes and generations (worker/expiry.py, the flow's release), on
real RabbitMQ, MariaDB and the project's nbd-server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection, AbstractQueue

from harness.nbd import NbdConnection, NbdError, NbdServerProcess
from tests.conftest import job, make_disk, running_worker, scheduler_for
from worker.settings import Settings

pytestmark = pytest.mark.integration


def lease_settings(settings: Settings) -> Settings:
    """Expiry looked at twice a second, the notice 3 s ahead, a 2 s grace."""
    return settings.model_copy(
        update={
            "live_sample_s": 0.2,
            "expiry_check_s": 0.5,
            "expiry_notice_s": 3.0,
            "expiry_grace_s": 2.0,
        }
    )


async def events_of(settings: Settings, amqp: AbstractConnection) -> AbstractQueue:
    channel = await amqp.channel()
    exchange = await channel.declare_exchange(
        settings.exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(exchange, routing_key=f"event.{settings.node_id}.#")
    return queue


async def wait_for_event(
    queue: AbstractQueue, kind: str, export_name: str, timeout_s: float, seen: list[dict[str, Any]]
) -> dict[str, Any]:
    """The first `kind` event of the export (every event read goes to `seen`)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        message = await queue.get(fail=False, no_ack=True)
        if message is None:
            await asyncio.sleep(0.05)
            continue
        event = json.loads(message.body)
        seen.append(event)
        if event["kind"] == kind and event["export_name"] == export_name:
            return event
    raise AssertionError(f"no {kind} event for {export_name} in {timeout_s} s: {seen}")


def disk_job(reply: dict[str, Any], kind: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": kind,
        "job_id": f"{kind}-{reply['generation']}-{len(extra)}-{id(extra)}",
        "vm_id": reply["vm_id"],
        "disk_unit_number": reply["disk_unit_number"],
        **extra,
    }


async def test_a_lease_with_no_copy_expires_fenced_flushed_released_and_said(
    settings: Settings, amqp: AbstractConnection, nbd_server: NbdServerProcess, disks_dir: Path
) -> None:
    live = lease_settings(settings)
    queue = await events_of(live, amqp)
    async with running_worker(live):
        scheduler = await scheduler_for(amqp, live)
        ready = await scheduler.request(job(device=make_disk(disks_dir, "l"), lease_s=5))
        assert ready["status"] == "ready", ready
        assert ready["lease_expires_at"] is not None
        name = ready["export_name"]
        started = asyncio.get_running_loop().time()
        seen: list[dict[str, Any]] = []
        expiring = await wait_for_event(queue, "expiring", name, 15, seen)
        expired = await wait_for_event(queue, "expired", name, 15, seen)
        took = asyncio.get_running_loop().time() - started
        assert took <= 15, took
        assert expiring["seq"] < expired["seq"]
        assert (expired["reason"], expired["forced"], expired["cut"]) == ("lease", False, 0)
        assert expired["generation"] == ready["generation"]

        status = await scheduler.request(disk_job(ready, "inspect-export"))
        assert status["export_status"] == "released", status
        authfile = (live.auth_dir / f"{name}.allow").read_text().splitlines()
        assert [line for line in authfile if not line.startswith("#")] == []
        assert not (live.link_dir / name).exists()
        assert not (live.nbd_conf_dir / f"{name}.conf").exists()
        with pytest.raises(NbdError):
            NbdConnection(nbd_server.port, name)
        await scheduler.channel.close()
    await queue.channel.close()
