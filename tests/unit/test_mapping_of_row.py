"""mapping_of_row() builds a Mapping as pydantic's model_construct() would, at less cost:
these tests catch a pydantic release that changes what a constructed model holds."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from worker.mappings import Mapping, mapping_of_row

LOOKUP_ROW: dict[str, Any] = {
    "id": 7,
    "node_id": "node-a",
    "vm_id": "4210a0e5-1a2b-4c3d-8e9f-0123456789ab",
    "disk_unit_number": 2,
    "vm_name": "pgtest2",
    "export_name": "migration-vm-4210a0e5-1a2b-4c3d-8e9f-0123456789ab-disk2",
    "device_path": "/dev/vdb",
    "device_id": "blk:252:16",
    "status": "active",
    "last_job_id": "job-41",
    "last_action": "created",
    "flush_error": None,
    "client_addresses": "127.0.0.1",
    "planned_bytes": 1 << 30,
    "generation": 5,
    "lease_s": 600,
    "lease_expires_at": datetime(2026, 12, 7, 10, 0, tzinfo=UTC),
    "idle_timeout_s": None,
    "fenced_at": None,
}


@pytest.mark.parametrize(
    "fields",
    [
        LOOKUP_ROW,  # what the mapping lookup reads (no created_at, updated_at, prepared_at)
        {**LOOKUP_ROW, "created_at": datetime(2026, 12, 1, tzinfo=UTC), "prepared_at": None},
    ],
)
def test_a_row_becomes_the_mapping_model_construct_would_make(fields: dict[str, Any]) -> None:
    built = mapping_of_row(dict(fields))
    expected = Mapping.model_construct(**fields)

    assert built == expected
    assert built.__dict__ == expected.__dict__
    assert list(built.__dict__) == list(Mapping.model_fields)  # declaration order
    assert built.model_fields_set == expected.model_fields_set == set(fields)
    assert built.model_dump() == expected.model_dump()
    assert built.model_dump_json() == expected.model_dump_json()
    assert built.__pydantic_extra__ is expected.__pydantic_extra__
    assert built.__pydantic_private__ is expected.__pydantic_private__


def test_fields_left_out_take_their_defaults_and_the_mapping_stays_frozen() -> None:
    built = mapping_of_row(dict(LOOKUP_ROW))

    assert built.created_at is None
    assert built.prepared_at is None
    assert built.is_active
    assert not built.fenced
    with pytest.raises(ValueError, match="frozen"):
        built.generation = 6
    assert built.model_copy(update={"generation": 6}).generation == 6


def test_the_caller_s_dict_is_not_shared_with_the_mapping() -> None:
    fields = dict(LOOKUP_ROW)
    built = mapping_of_row(fields)
    fields["generation"] = 99

    assert built.generation == 5
