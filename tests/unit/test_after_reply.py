"""Work deferred until a job's reply is out (worker/after_reply.py)."""

from __future__ import annotations

import asyncio

import pytest

from worker.after_reply import after_reply, reply_scope, run_deferred


def test_outside_a_scope_deferred_work_runs_at_once() -> None:
    done: list[str] = []
    after_reply(lambda: done.append("now"))
    assert done == ["now"]


def test_in_a_scope_it_waits_and_runs_in_order_past_a_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    done: list[str] = []

    def fails() -> None:
        raise RuntimeError("boom")

    with reply_scope() as deferred:
        after_reply(lambda: done.append("first"))
        after_reply(fails)
        after_reply(lambda: done.append("last"))
    assert done == []
    run_deferred(deferred)
    assert done == ["first", "last"]
    assert "Work deferred until after the reply failed" in caplog.text
    assert deferred == []
    run_deferred(deferred)  # a second run (the consumer's finally) runs nothing again
    assert done == ["first", "last"]


async def test_each_job_task_has_its_own_scope() -> None:
    done: list[str] = []

    async def job(name: str) -> list[object]:
        with reply_scope() as deferred:
            await asyncio.sleep(0)  # the other job runs in between
            after_reply(lambda: done.append(name))
            await asyncio.sleep(0)
        return list(deferred)

    a, b = await asyncio.gather(job("a"), job("b"))
    assert (len(a), len(b), done) == (1, 1, [])
    after_reply(lambda: done.append("outside"))  # the scopes ended with their jobs
    assert done == ["outside"]
