"""Retries with tenacity that cost nothing when the first try succeeds.

Building a tenacity policy for every database statement and every job showed up in the
reuse path's profile (a few percent of its CPU); almost every call succeeds at once, so
the policy is built only after a retryable failure, which it then counts as its first try.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import AsyncRetrying

T = TypeVar("T")


async def call_with_retries(
    fn: Callable[[], Awaitable[T]],
    policy: Callable[[], AsyncRetrying],
    retryable: Callable[[BaseException], bool],
) -> T:
    """`await fn()`, retried by `policy()` on failures that are `retryable` (the policy's
    own `retry` condition decides the later tries)."""
    try:
        return await fn()
    except Exception as exc:
        if not retryable(exc):
            raise
        failure: Exception | None = exc
    async for attempt in policy():
        with attempt:
            if failure is not None:
                pending, failure = failure, None
                raise pending  # the try already made: counted, then waited on
            return await fn()
    raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover
