"""KeyedLocks: the flow's per-(VM, disk) locks, and the epochs that let a lock-free reader
tell whether anyone held a key's lock while it was not looking."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class KeyedLocks:
    """One asyncio.Lock per key, dropped when nobody holds or waits for it; and an epoch
    per key that moves on every release, so a lock-free reader can tell whether anyone held
    the key's lock while it was not looking (the epochs share a fixed number of slots, so
    memory stays bounded: another key's release may look like this key's, never the other
    way round)."""

    EPOCH_SLOTS = 4096

    def __init__(self) -> None:
        self._locks: dict[tuple[str, int], tuple[asyncio.Lock, int]] = {}
        self._epochs = [0] * self.EPOCH_SLOTS

    def epoch(self, key: tuple[str, int]) -> int:
        return self._epochs[hash(key) % self.EPOCH_SLOTS]

    @contextlib.asynccontextmanager
    async def hold(self, key: tuple[str, int]) -> AsyncIterator[None]:
        """Holds the key's lock."""
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            self._epochs[hash(key) % self.EPOCH_SLOTS] += 1
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)

    def __contains__(self, key: object) -> bool:
        """Whether someone holds or waits for the key's lock now."""
        return key in self._locks
