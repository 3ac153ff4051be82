"""Thousands of generated hostile messages through a real worker: every one gets a reply,
the worker stays up, and nothing is written outside the config and link directories."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aio_pika.abc import AbstractConnection
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import RunningWorker, Scheduler, running_worker
from tests.strategies import MESSAGE_BODIES
from worker.settings import Settings

pytestmark = pytest.mark.integration

BATCH = 250
BATCHES = 8


def tree(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


@pytest.fixture
async def fuzz_worker(settings: Settings) -> AsyncIterator[RunningWorker]:
    # A volume_id is looked up at once: no waiting for udev in a test.
    async with running_worker(settings.model_copy(update={"udev_wait_s": 0})) as running:
        yield running


@pytest.fixture
async def fuzz_scheduler(
    amqp: AbstractConnection, fuzz_worker: RunningWorker
) -> AsyncIterator[Scheduler]:
    channel = await amqp.channel()
    scheduler = Scheduler(channel, fuzz_worker.settings.request_queue)
    await scheduler.start()
    yield scheduler
    await channel.close()


@pytest.mark.slow  # hundreds of generated messages through a real worker
@settings(
    max_examples=BATCHES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,  # one worker serves every batch, on purpose
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)
@given(bodies=st.lists(MESSAGE_BODIES, min_size=BATCH, max_size=BATCH))
async def test_generated_messages_all_get_a_reply_and_write_nothing_outside(
    fuzz_worker: RunningWorker, fuzz_scheduler: Scheduler, tmp_path: Path, bodies: list[bytes]
) -> None:
    settings = fuzz_worker.settings
    before = tree(tmp_path)
    corrs = [await fuzz_scheduler.publish(body) for body in bodies]
    replies = await asyncio.gather(*(fuzz_scheduler.reply(c, timeout_s=60) for c in corrs))
    assert not fuzz_worker.task.done(), "the worker stopped"
    for reply in replies:
        # The disks are under tmp_path; the generated device paths are not: every request
        # is refused, and says why.
        assert reply["status"] == "error"
        assert reply["error"]["code"] in {"invalid_request", "device_not_found"}
        assert reply["error"]["message"]
    new = tree(tmp_path) - before
    allowed = (settings.nbd_conf_dir, settings.link_dir)
    assert [p for p in new if not any(p.is_relative_to(d) for d in allowed)] == []
    assert [p for p in settings.nbd_conf_dir.iterdir() if p.name.startswith("migration-")] == []
