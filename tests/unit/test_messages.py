from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from worker.messages import (
    DEVICE_PATH_PATTERN,
    JOB_ID_PATTERN,
    ExportFailed,
    PrepareExport,
    ReleaseExport,
    export_name,
    message_schemas,
    parse_request,
    salvage_job_id,
)

VALID: dict[str, Any] = {
    "job_id": "job-42",
    "vm_id": "4205784a-098a-40f1-1f1e-a5cd2597fd59",
    "vm_name": "pgtest2",
    "disk_unit_number": 0,
    "device_path": "/dev/vdb",
}


def test_valid_request_is_parsed_and_vm_id_lower_cased() -> None:
    req = PrepareExport.model_validate({**VALID, "vm_id": VALID["vm_id"].upper(), "extra": 1})
    assert req.vm_id == VALID["vm_id"]
    assert req.export_name == "migration-vm-4205784a-098a-40f1-1f1e-a5cd2597fd59-disk0"


def test_export_name_follows_the_contract() -> None:
    assert export_name("ABCDEF01-0000-0000-0000-000000000000", 12) == (
        "migration-vm-abcdef01-0000-0000-0000-000000000000-disk12"
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("job_id", ""),
        ("job_id", "a" * 129),
        ("job_id", "job 42"),
        ("job_id", "job/42"),
        ("vm_id", "4205784a-098a-40f1-1f1e-a5cd2597fd5"),
        ("vm_id", "4205784a-098a-40f1-1f1e-a5cd2597fd59\n"),
        ("vm_id", "4205784a-098a-40f1-1f1e-a5cd2597fd5]"),
        ("vm_id", "4205784a098a40f11f1ea5cd2597fd59"),
        ("vm_id", "g205784a-098a-40f1-1f1e-a5cd2597fd59"),
        ("vm_name", ""),
        ("vm_name", "x" * 256),
        ("vm_name", "line\nbreak"),
        ("vm_name", "bell\x07"),
        ("disk_unit_number", -1),
        ("disk_unit_number", 256),
        ("disk_unit_number", "0"),
        ("disk_unit_number", True),
        ("disk_unit_number", 1.5),
        ("device_path", "dev/vdb"),
        ("device_path", "/dev/../etc/passwd"),
        ("device_path", "/dev/./vdb"),
        ("device_path", "/dev//vdb"),
        ("device_path", "/dev/vdb/"),
        ("device_path", "/dev/vd b"),
        ("device_path", "/dev/vdb\n"),
        ("device_path", "/dev/$(reboot)"),
        ("device_path", "/dev/" + "a" * 1100),
        ("device_path", "/"),
    ],
)
def test_invalid_fields_are_rejected(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as caught:
        PrepareExport.model_validate({**VALID, field: value})
    assert caught.value.errors()[0]["loc"][0] == field


@pytest.mark.parametrize("field", list(VALID))
def test_every_field_is_required(field: str) -> None:
    body = {k: v for k, v in VALID.items() if k != field}
    with pytest.raises(ValidationError):
        PrepareExport.model_validate(body)


@pytest.mark.parametrize(
    "path",
    ["/dev/vdb", "/dev/disk/by-id/virtio-0a1b2c3d4e5f6a7b8c9d", "/dev/disk/by-path/pci-0:05.0"],
)
def test_device_paths_udev_uses_are_accepted(path: str) -> None:
    assert PrepareExport.model_validate({**VALID, "device_path": path}).device_path == path


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (json.dumps({"job_id": "job-1", "vm_id": "bad"}).encode(), "job-1"),
        (json.dumps({"job_id": "bad id\n"}).encode(), None),
        (json.dumps({"job_id": 42}).encode(), None),
        (b"[1, 2]", None),
        (b"not json", None),
        (b"\xff\xfe", None),
        (b"[" * 5000, None),
    ],
)
def test_salvage_job_id_only_returns_well_formed_ids(body: bytes, expected: str | None) -> None:
    assert salvage_job_id(body) == expected


def test_error_reply_shape() -> None:
    reply = ExportFailed.model_validate(
        {"job_id": None, "error": {"code": "invalid_request", "message": "m"}}
    )
    assert json.loads(reply.model_dump_json()) == {
        "job_id": None,
        "vm_id": None,
        "disk_unit_number": None,
        "status": "error",
        "error": {
            "code": "invalid_request",
            "message": "m",
            "cause": None,
            "errno": None,
            "connections": None,
        },
        "node_id": None,
    }


def test_schema_files_match_the_models() -> None:
    directory = Path(__file__).resolve().parents[2] / "schema" / "messages"
    on_disk = {p.name: p.read_text() for p in directory.glob("*.json")}
    assert on_disk == message_schemas(), "run `nbd-export-worker schemas` and commit the result"


def test_prepare_export_schema_carries_the_validation_patterns() -> None:
    schema = json.loads(message_schemas()["prepare-export.json"])
    assert set(schema["required"]) == set(VALID) - {"device_path"}
    assert [branch["required"] for branch in schema["oneOf"]] == [["device_path"], ["volume_id"]]
    assert schema["properties"]["job_id"]["pattern"] == JOB_ID_PATTERN
    path_types = schema["properties"]["device_path"]["anyOf"]
    assert {"type": "string", "pattern": DEVICE_PATH_PATTERN} in path_types


def test_requests_are_told_apart_by_type() -> None:
    assert isinstance(parse_request(json.dumps(VALID).encode()), PrepareExport)
    typed = {**VALID, "type": "prepare-export"}
    assert isinstance(parse_request(json.dumps(typed).encode()), PrepareExport)
    release = {"type": "release-export", "job_id": "j", "vm_id": VALID["vm_id"].upper()}
    parsed = parse_request(json.dumps({**release, "disk_unit_number": 3}).encode())
    assert isinstance(parsed, ReleaseExport)
    assert parsed.export_name == f"migration-vm-{VALID['vm_id']}-disk3"
    for bad in ({**VALID, "type": "drop-table"}, release, {"type": 1}):
        with pytest.raises(ValidationError):
            parse_request(json.dumps(bad).encode())


def test_a_job_names_its_device_by_exactly_one_of_path_and_volume() -> None:
    volume = "0A1B2C3D-4E5F-6A7B-8C9D-0E1F2A3B4C5D"
    by_volume = {k: v for k, v in VALID.items() if k != "device_path"} | {"volume_id": volume}
    parsed = parse_request(json.dumps(by_volume).encode())
    assert isinstance(parsed, PrepareExport)
    assert (parsed.volume_id, parsed.device_path) == (volume.lower(), None)
    for bad in (
        {**VALID, "volume_id": volume},
        {k: v for k, v in VALID.items() if k != "device_path"},
        {**by_volume, "volume_id": "../../etc/passwd"},
        {**by_volume, "volume_id": volume + "0"},
    ):
        with pytest.raises(ValidationError):
            parse_request(json.dumps(bad).encode())
