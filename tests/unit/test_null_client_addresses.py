"""Rows from before access control (client_addresses NULL) admit the worker's default: the
repository resolves that once, on every read path, so nothing above it applies a default."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import aiomysql

from worker.repository import _FIELDS, Repository

VM = "4205784a-098a-40f1-1f1e-a5cd2597fd59"
NAME = f"migration-vm-{VM}-disk0"
DEFAULT = ("10.0.0.7", "::1")


class OneRowPool:
    """Stands in for aiomysql's pool: every query returns `row`."""

    maxsize = 1  # lookups take a connection from the pool each time, as the rest

    def __init__(self, row: tuple[Any, ...]) -> None:
        self.row = row

    async def acquire(self) -> OneRowPool:
        return self

    def release(self, _: object) -> None:
        pass

    @asynccontextmanager
    async def cursor(self) -> AsyncIterator[OneRowPool]:
        yield self

    async def execute(self, *_: object) -> None:
        pass

    async def fetchone(self) -> tuple[Any, ...]:
        return self.row

    async def fetchall(self) -> list[tuple[Any, ...]]:
        return [self.row]


def repository(row: tuple[Any, ...]) -> Repository:
    pool = cast(aiomysql.Pool, OneRowPool(row))
    return Repository(pool, "n", client_addresses=DEFAULT)


def full_row(client_addresses: str | None) -> tuple[Any, ...]:
    values = {
        "id": 1, "node_id": "n", "vm_id": VM, "disk_unit_number": 0, "vm_name": "vm",
        "export_name": NAME, "device_path": "/dev/vdb", "device_id": "blk:252:16",
        "status": "active", "created_at": None, "updated_at": None, "last_job_id": "j",
        "last_action": "created", "flush_error": None, "client_addresses": client_addresses,
        "planned_bytes": None, "prepared_at": None, "generation": 0, "lease_s": None,
        "lease_expires_at": None, "idle_timeout_s": None, "fenced_at": None,
    }  # fmt: skip
    return tuple(values[name] for name in _FIELDS)


def lookup_row(client_addresses: str | None) -> tuple[Any, ...]:
    # The key's index in its statement (the only key: 0), then id, vm_name, export_name,
    # device_path, device_id, status, last_job_id, last_action, flush_error,
    # client_addresses, then the job's reply (none).
    values = [0, 1, "vm", NAME, "/dev/vdb", "blk:252:16", "active", "j", "created", None]
    # planned_bytes, generation, lease_s, lease_expires_at, idle_timeout_s, fenced_at; reply
    return (json.dumps([*values, client_addresses, None, 0, None, None, None, None, None]),)


async def test_every_read_gives_an_old_row_the_default() -> None:
    mapping, _ = await repository(lookup_row(None)).lookup(VM, 0, "job")
    assert mapping is not None
    assert mapping.client_addresses == "10.0.0.7,::1"
    committed = await repository(("/dev/vdb", None, 0)).committed_export(NAME)
    assert committed is not None
    assert committed.client_addresses == "10.0.0.7,::1"
    assert committed.admitted() == DEFAULT
    (listed,) = await repository(full_row(None)).list_mappings()
    assert listed.client_addresses == "10.0.0.7,::1"
    assert listed.admitted() == DEFAULT
    found = await repository(full_row(None)).find_active_by_device("blk:252:16")
    assert found is not None
    assert found.client_addresses == "10.0.0.7,::1"


async def test_a_stored_value_is_read_as_stored() -> None:
    mapping, _ = await repository(lookup_row("192.0.2.1")).lookup(VM, 0, "job")
    assert mapping is not None
    assert mapping.client_addresses == "192.0.2.1"
    committed = await repository(("/dev/vdb", "192.0.2.1", 0)).committed_export(NAME)
    assert committed is not None
    assert committed.client_addresses == "192.0.2.1"
    (listed,) = await repository(full_row("192.0.2.1")).list_mappings()
    assert listed.client_addresses == "192.0.2.1"
