"""SchedulerClient without a broker: every error code has its exception, replies parse into
the models, and bad input fails before anything is published."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from worker.client import (
    ERROR_CLASSES,
    ExportError,
    ExportInUse,
    FlushFailed,
    ReplyTimeout,
    RetriesExhausted,
    SchedulerClient,
    UnexpectedReply,
    parse_reply,
)
from worker.messages import ErrorCode, ExportFailed, ExportReady, ExportReleased

VM = "4205784a-098a-40f1-1f1e-a5cd2597fd59"


def failed(code: ErrorCode, **error: Any) -> dict[str, Any]:
    return {
        "job_id": "job-1",
        "vm_id": VM,
        "disk_unit_number": 0,
        "status": "error",
        "node_id": "n1",
        "error": {"code": code.value, "message": f"it is {code.value}", **error},
    }


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_error_code_raises_its_own_class(code: ErrorCode) -> None:
    cls = ERROR_CLASSES[code]
    assert cls is not ExportError
    assert cls.CODE is code
    with pytest.raises(cls) as raised:
        parse_reply(json.dumps(failed(code)).encode(), ExportReady)
    assert raised.value.code is code
    assert raised.value.message == f"it is {code.value}"
    assert raised.value.reply == ExportFailed.model_validate(failed(code))
    assert type(raised.value).__name__.lower() == code.value.replace("_", "")


def test_the_classes_are_one_per_code() -> None:
    assert sorted(ERROR_CLASSES) == sorted(ErrorCode)
    assert len(set(ERROR_CLASSES.values())) == len(ErrorCode)


def test_an_error_class_carries_its_code_s_details() -> None:
    connection = {
        "client_address": "127.0.0.1",
        "client_port": 40000,
        "connected_at": "2026-12-07T10:00:01Z",
        "tls": False,
        "device": "current",
        "bytes_written": 1,
        "bytes_read": 2,
    }
    in_use = ExportFailed.model_validate(failed(ErrorCode.EXPORT_IN_USE, connections=[connection]))
    error = ExportError.from_reply(in_use)
    assert isinstance(error, ExportInUse)
    assert [c.client_port for c in error.connections] == [40000]

    flush = ExportError.from_reply(
        ExportFailed.model_validate(failed(ErrorCode.FLUSH_FAILED, errno="EIO"))
    )
    assert isinstance(flush, FlushFailed)
    assert flush.errno == "EIO"

    exhausted = ExportError.from_reply(
        ExportFailed.model_validate(
            failed(ErrorCode.RETRIES_EXHAUSTED, cause="database_unavailable")
        )
    )
    assert isinstance(exhausted, RetriesExhausted)
    assert exhausted.cause is ErrorCode.DATABASE_UNAVAILABLE


def test_a_reply_parses_into_its_model() -> None:
    body = {
        "job_id": "job-1",
        "vm_id": VM,
        "disk_unit_number": 0,
        "status": "released",
        "export_name": f"migration-vm-{VM}-disk0",
        "was_active": True,
        "flushed": True,
        "node_id": "n1",
        "mode": "drain",
        "cut": 0,
    }
    released = parse_reply(json.dumps(body).encode(), ExportReleased)
    assert released == ExportReleased.model_validate(body)


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[1, 2]", b'{"status": "ready"}', b'{"status": "error", "error": {}}'],
)
def test_anything_else_is_an_unexpected_reply(body: bytes) -> None:
    with pytest.raises(UnexpectedReply):
        parse_reply(body, ExportReady)


def test_a_reply_timeout_is_a_timeout_error() -> None:
    assert issubclass(ReplyTimeout, TimeoutError)


async def test_bad_input_fails_before_publishing() -> None:
    # Never connected: a request that got as far as publishing would wait, not raise.
    client = SchedulerClient(
        ["amqp://127.0.0.1:1/"],
        exchange="x",
        request_queue="q",
        node_id=None,
        timeout_s=0.1,
        connect_timeout_s=0.1,
    )
    with pytest.raises(ValidationError, match="vm_id"):
        await client.prepare("not-a-uuid", 0, vm_name="v", device_path="/dev/vdb")
    with pytest.raises(ValidationError, match="device_path and volume_id"):
        await client.prepare(VM, 0, vm_name="v")
    with pytest.raises(ValidationError, match="device_path"):
        await client.prepare(VM, 0, vm_name="v", device_path="/dev/../vdb")
    with pytest.raises(ValidationError, match="lease_s"):
        await client.prepare(VM, 0, vm_name="v", device_path="/dev/vdb", lease_s=1)
    with pytest.raises(ValidationError, match="mode"):
        await client.release(VM, 0, mode="gentle")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="generation"):
        await client.flush(VM, 0, generation=0)
    with pytest.raises(ValidationError, match="disk_unit_number"):
        await client.inspect(VM, 256)
    with pytest.raises(ReplyTimeout, match="not published"):
        await client.inspect(VM, 0)
    await client.close()
