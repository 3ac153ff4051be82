"""Concurrent calls for one key each, run as few calls for many keys (group commit's idea).

At concurrency 16 the reuse path's mapping lookups overlap: when one starts, a median of two
or three others are waiting on the database (bench/profile.py). Each statement costs the
worker a driver round trip and MariaDB a parse and a plan, so the lookups asked while
statements are in flight go together in the next one. With nothing in flight a lookup
starts at once: a lone job waits for nothing.

A key asked is never answered from a statement sent before it was asked, so what a caller
reads is never older than its own call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Coalescer(Generic[K, V]):
    """`get(key)` is `run_many([key, ...])`'s answer for that key. At most `limit` calls of
    `run_many` run at once, each with at most `max_batch` keys; keys asked meanwhile wait for
    a call to end and go in the next one. A call that raises raises in each of its keys'
    callers."""

    def __init__(
        self,
        run_many: Callable[[list[K]], Awaitable[list[V]]],
        *,
        limit: int,
        max_batch: int,
    ) -> None:
        if limit < 1 or max_batch < 1:
            raise ValueError("limit and max_batch must be at least 1")
        self._run_many = run_many
        self._limit = limit
        self._max_batch = max_batch
        self._waiting: list[tuple[K, asyncio.Future[V]]] = []
        #: Calls of run_many running: in their callers' tasks or in these.
        self._busy = 0
        self._running: set[asyncio.Task[None]] = set()

    async def get(self, key: K) -> V:
        if self._busy < self._limit and not self._waiting:
            # Nothing to wait for or to join: the call runs in this task, with no task or
            # future of its own (a lone job's lookup, every time at concurrency 1).
            self._busy += 1
            try:
                (value,) = await self._answers([key])
            finally:
                self._ended()
            return value
        future: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        self._waiting.append((key, future))
        if self._busy < self._limit:
            self._start()
        return await future

    def _start(self) -> None:
        batch = self._waiting[: self._max_batch]
        del self._waiting[: self._max_batch]
        self._busy += 1
        task = asyncio.ensure_future(self._run(batch))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    def _ended(self) -> None:
        self._busy -= 1
        if self._waiting and self._busy < self._limit:
            self._start()

    async def _answers(self, keys: list[K]) -> list[V]:
        values = await self._run_many(keys)
        if len(values) != len(keys):
            raise RuntimeError(f"{len(values)} answers for {len(keys)} keys")
        return values

    async def _run(self, batch: list[tuple[K, asyncio.Future[V]]]) -> None:
        try:
            values = await self._answers([key for key, _ in batch])
        except BaseException as exc:
            self._ended()
            for _, future in batch:
                if not future.done():
                    if isinstance(exc, asyncio.CancelledError):
                        future.cancel()
                    else:
                        future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        self._ended()
        for (_, future), value in zip(batch, values, strict=True):
            if not future.done():  # its caller may have been cancelled meanwhile
                future.set_result(value)
