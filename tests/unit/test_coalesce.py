"""Coalescer: concurrent single-key calls run as few many-key calls, each caller gets its
own key's answer, and nothing is answered from a call sent before it was asked."""

from __future__ import annotations

import asyncio

import pytest

from worker.coalesce import Coalescer


async def turns() -> None:
    """Lets every task started so far run as far as it can."""
    for _ in range(5):
        await asyncio.sleep(0)


class Recorder:
    """run_many that records each call's keys and holds it until released."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.release = asyncio.Event()
        #: A call with one of these keys fails.
        self.failing: set[int] = set()

    async def run_many(self, keys: list[int]) -> list[str]:
        self.calls.append(list(keys))
        await self.release.wait()
        if self.failing.intersection(keys):
            raise OSError("lost the database")
        return [f"answer-{key}" for key in keys]


async def test_a_lone_call_runs_at_once_with_its_key() -> None:
    recorder = Recorder()
    recorder.release.set()
    coalescer = Coalescer(recorder.run_many, limit=1, max_batch=64)
    assert await coalescer.get(7) == "answer-7"
    assert recorder.calls == [[7]]


async def test_keys_asked_during_a_call_go_together_in_the_next_and_get_their_own_answers() -> None:
    recorder = Recorder()
    coalescer = Coalescer(recorder.run_many, limit=1, max_batch=64)
    first = asyncio.create_task(coalescer.get(1))
    await turns()
    assert recorder.calls == [[1]]  # sent at once
    later = [asyncio.create_task(coalescer.get(key)) for key in (2, 3, 2)]
    await turns()
    # Asked while the first call ran: not answered by it, and not sent yet.
    assert recorder.calls == [[1]]
    recorder.release.set()
    assert await first == "answer-1"
    assert [await task for task in later] == ["answer-2", "answer-3", "answer-2"]
    assert recorder.calls == [[1], [2, 3, 2]]


async def test_at_most_limit_calls_run_and_batches_are_capped() -> None:
    recorder = Recorder()
    coalescer = Coalescer(recorder.run_many, limit=2, max_batch=2)
    tasks = [asyncio.create_task(coalescer.get(key)) for key in range(7)]
    await turns()
    assert recorder.calls == [[0], [1]]
    recorder.release.set()
    assert await asyncio.gather(*tasks) == [f"answer-{key}" for key in range(7)]
    assert sorted(len(call) for call in recorder.calls) == [1, 1, 1, 2, 2]


async def test_a_failed_call_raises_in_each_of_its_callers_and_the_next_call_runs() -> None:
    recorder = Recorder()
    recorder.failing = {1}
    coalescer = Coalescer(recorder.run_many, limit=1, max_batch=64)
    first = asyncio.create_task(coalescer.get(0))
    await turns()
    tasks = [asyncio.create_task(coalescer.get(key)) for key in (1, 2)]
    await turns()
    recorder.release.set()
    assert await first == "answer-0"
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert recorder.calls == [[0], [1, 2]]
    assert [type(result) for result in results] == [OSError, OSError]
    assert await coalescer.get(3) == "answer-3"


async def test_a_cancelled_caller_leaves_the_others_answered() -> None:
    recorder = Recorder()
    coalescer = Coalescer(recorder.run_many, limit=1, max_batch=64)
    first = asyncio.create_task(coalescer.get(1))
    await turns()
    waiting = [asyncio.create_task(coalescer.get(key)) for key in (2, 3)]
    await turns()
    waiting[0].cancel()
    recorder.release.set()
    assert await first == "answer-1"
    assert await waiting[1] == "answer-3"
    with pytest.raises(asyncio.CancelledError):
        await waiting[0]


async def test_a_wrong_number_of_answers_is_an_error_not_a_hang() -> None:
    release = asyncio.Event()

    async def short(keys: list[int]) -> list[str]:
        await release.wait()
        return ["one"]

    coalescer = Coalescer(short, limit=1, max_batch=64)
    tasks = [asyncio.create_task(coalescer.get(key)) for key in (1, 2, 3)]
    await turns()
    release.set()
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
    assert results[0] == "one"  # alone in its call: one answer for one key
    assert all(isinstance(result, RuntimeError) for result in results[1:])


async def test_a_lone_call_runs_in_its_callers_task() -> None:
    """With nothing running, a call makes no task of its own: what it raises, and its
    cancellation, are its caller's, and the next keys still run."""
    seen: list[asyncio.Task[object] | None] = []
    never = asyncio.Event()

    async def run_many(keys: list[int]) -> list[int]:
        seen.append(asyncio.current_task())
        if keys == [0]:
            raise OSError("lost the database")
        if keys == [6]:
            await never.wait()  # until its caller is cancelled
        await asyncio.sleep(0)
        return keys

    coalescer = Coalescer(run_many, limit=1, max_batch=64)
    caller = asyncio.create_task(coalescer.get(5))
    assert await caller == 5
    assert seen == [caller]
    with pytest.raises(OSError, match="lost the database"):
        await coalescer.get(0)
    cancelled = asyncio.create_task(coalescer.get(6))
    await turns()
    queued = asyncio.create_task(coalescer.get(7))  # waits for the running call
    await turns()
    assert not queued.done()
    cancelled.cancel()
    assert await queued == 7  # started once the cancelled call ended
    assert cancelled.cancelled()
    assert await coalescer.get(8) == 8
