"""JobLedger batching: awaited records are written at once, background ones gather."""

from __future__ import annotations

import asyncio

from worker.jobs import JobLedger
from worker.mappings import JobRecord


class SlowStore:
    """Records each INSERT's job_ids; each INSERT takes `delay_s`, like a round trip."""

    def __init__(self, delay_s: float = 0.005) -> None:
        self.delay_s = delay_s
        self.statements: list[list[str]] = []

    async def record_jobs(self, records: list[JobRecord]) -> None:
        await asyncio.sleep(self.delay_s)
        self.statements.append([r.job_id for r in records])


def _record(job_id: str) -> JobRecord:
    return JobRecord(job_id=job_id, vm_id="v", disk_unit_number=0, reply={})


async def test_background_records_keep_gathering_while_an_insert_runs() -> None:
    store = SlowStore()
    ledger = JobLedger(store, background_delay_s=0.05)
    # A steady trickle, a record every millisecond or so: with the delay honoured between
    # INSERTs that is one statement per 50 ms, not one per 5 ms round trip.
    loop = asyncio.get_running_loop()
    started = loop.time()
    for i in range(120):
        ledger.record_later(_record(f"bg-{i}"))
        await asyncio.sleep(0.001)
    elapsed = loop.time() - started
    await ledger.close()
    written = [job for statement in store.statements for job in statement]
    assert sorted(written) == sorted(f"bg-{i}" for i in range(120))
    assert len(store.statements) <= elapsed / 0.05 + 2, [len(s) for s in store.statements]


async def test_an_awaited_record_is_written_at_once_with_what_waits() -> None:
    store = SlowStore()
    ledger = JobLedger(store, background_delay_s=10.0)
    ledger.record_later(_record("bg-1"))
    await asyncio.wait_for(ledger.record(_record("create-1")), 1.0)  # not after 10 s
    assert store.statements == [["bg-1", "create-1"]]
    await ledger.close()


async def test_close_writes_background_records_left_by_a_running_insert() -> None:
    store = SlowStore(delay_s=0.02)
    ledger = JobLedger(store, background_delay_s=10.0)
    waiting = asyncio.create_task(ledger.record(_record("create-1")))
    await asyncio.sleep(0.005)  # the INSERT for create-1 is running
    ledger.record_later(_record("bg-1"))
    await ledger.close()
    await waiting
    assert store.statements == [["create-1"], ["bg-1"]]


async def test_a_backlog_of_background_records_drains_back_to_back() -> None:
    store = SlowStore(delay_s=0.001)
    ledger = JobLedger(store, background_delay_s=0.3)
    for i in range(1200):
        ledger.record_later(_record(f"bg-{i}"))
    # The timer fires once at 0.3 s; full batches are followed at once, not 0.3 s apart.
    await asyncio.sleep(0.5)
    assert [len(s) for s in store.statements] == [500, 500, 200]
    await ledger.close()
