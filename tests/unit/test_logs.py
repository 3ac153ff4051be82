"""The log formats: the text line's time is logging's own, made once a second; job fields
bound in a task appear on its lines and nowhere else."""

from __future__ import annotations

import asyncio
import logging

from worker.logs import JobContextFilter, TextFormatter, bind_job


def record(created: float) -> logging.LogRecord:
    line = logging.LogRecord("worker.flow", logging.INFO, "", 0, "Export ready", None, None)
    line.created = created
    line.msecs = int((created - int(created)) * 1000)
    return line


def test_the_text_time_is_what_logging_itself_writes_across_seconds() -> None:
    ours = TextFormatter()
    logging_own = logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    for created in (1_765_000_000.998, 1_765_000_000.999, 1_765_000_001.0, 1_765_000_001.5):
        assert ours.format(record(created)) == logging_own.format(record(created))
    later = record(1_765_000_061.25)
    assert ours.format(later) == logging_own.format(later)  # a new second, a new stamp


async def test_job_fields_stay_with_their_task() -> None:
    formatter = TextFormatter()
    context = JobContextFilter()

    async def job(job_id: str) -> str:
        bind_job(job_id=job_id, vm_id=None)
        await asyncio.sleep(0)
        bind_job(outcome="reused")
        line = record(1_765_000_000.0)
        context.filter(line)
        return formatter.format(line)

    first, second = await asyncio.gather(job("job-1"), job("job-2"))
    assert first.endswith("Export ready job_id=job-1 outcome=reused")
    assert second.endswith("Export ready job_id=job-2 outcome=reused")
