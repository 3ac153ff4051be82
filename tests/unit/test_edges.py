"""Devices, settings, the consumer's pure helpers and the repository's pure helpers."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pymysql
import pytest
from pydantic import AnyUrl, ValidationError
from tenacity import AsyncRetrying, stop_after_attempt

from worker.devices import (
    DevicePolicy,
    HeldDevices,
    device_identity,
    fsync_device,
    open_device,
)
from worker.errors import (
    DatabaseError,
    DeviceNotFound,
    FlushFailed,
    InvalidRequest,
    TransactionConflict,
    TransientDatabaseError,
    WorkerError,
)
from worker.messages import parse_request
from worker.replies import describe_validation_error
from worker.repository import database_name, retry_policy, split_statements, translate_error
from worker.retrying import call_with_retries
from worker.settings import Settings, mask_url
from worker.topology import request_queue_arguments


def test_device_policy(tmp_path: Path) -> None:
    roots = tmp_path / "dev"
    roots.mkdir()
    regular = roots / "disk"
    regular.write_bytes(b"")
    outside = tmp_path / "secret"
    outside.write_bytes(b"")
    (roots / "escape").symlink_to(outside)
    (roots / "inside").symlink_to(regular)

    strict = DevicePolicy((roots,))
    lenient = DevicePolicy((roots,), allow_regular_files=True)
    lenient.check(str(regular))
    lenient.check(str(roots / "inside"))
    with pytest.raises(InvalidRequest, match="not a block device"):
        strict.check(str(regular))
    with pytest.raises(InvalidRequest, match="resolves outside"):
        lenient.check(str(roots / "escape"))
    with pytest.raises(InvalidRequest, match="not under an allowed"):
        lenient.check(str(outside))
    with pytest.raises(DeviceNotFound):
        lenient.check(str(roots / "absent"))


def test_a_checked_path_sees_its_link_re_pointed_at_the_next_check(tmp_path: Path) -> None:
    """What a path resolved to is remembered by the inodes it was seen through: a link
    re-pointed (a new inode, as udev and ln -sf make it), a chain's last link re-pointed,
    or a file replaced under the same name all resolve afresh."""
    roots = tmp_path / "dev"
    roots.mkdir()
    first, second = roots / "vdb", roots / "vdc"
    first.write_bytes(b"a")
    second.write_bytes(b"bb")
    outside = tmp_path / "secret"
    outside.write_bytes(b"")
    link, chain = roots / "by-id-disk", roots / "chain"
    link.symlink_to(first)
    chain.symlink_to(link)
    policy = DevicePolicy((roots,), allow_regular_files=True)

    def repoint(path: Path, target: Path) -> None:
        path.with_name("tmp-link").symlink_to(target)
        os.replace(path.with_name("tmp-link"), path)

    assert policy.check(str(link)).resolved == str(first)
    assert policy.check(str(chain)).resolved == str(first)
    assert policy.check(str(link)).resolved == str(first)  # remembered: the same again
    repoint(link, second)
    found = policy.check(str(chain))
    assert (found.resolved, found.size_bytes) == (str(second), 2)
    assert found.device_id == device_identity(second.stat())
    assert policy.check(str(link)).resolved == str(second)
    repoint(link, outside)
    with pytest.raises(InvalidRequest, match="resolves outside"):
        policy.check(str(link))
    with pytest.raises(InvalidRequest, match="resolves outside"):
        policy.check(str(chain))
    second.unlink()
    second.write_bytes(b"ccc")  # the same name, another file
    repoint(link, second)
    found = policy.check(str(link))
    assert found.device_id == device_identity(second.stat())
    assert found.size_bytes == 3
    link.unlink()
    with pytest.raises(DeviceNotFound):
        policy.check(str(link))


def test_device_policy_accepts_block_devices() -> None:
    candidates = (f"/dev/{name}" for name in sorted(os.listdir("/dev")))
    block = next((p for p in candidates if stat.S_ISBLK(os.stat(p).st_mode)), None)
    assert block is not None, "this machine has no block device in /dev to test with"
    DevicePolicy((Path("/dev"),)).check(block)


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXPORT_WORKER_DEVICE_ROOTS", "/dev, /srv/disks")
    monkeypatch.setenv("EXPORT_WORKER_ALLOW_REGULAR_FILES", "true")
    monkeypatch.setenv("EXPORT_WORKER_DATABASE_URL", "mysql://u:secret@db:3307/x")
    settings = Settings()
    assert settings.device_roots == (Path("/dev"), Path("/srv/disks"))
    assert settings.allow_regular_files is True
    assert "secret" not in str(settings.masked())
    assert settings.request_queue == "nbd.prepare-export"
    assert settings.reply_queue == "nbd.export-ready"
    assert settings.nbd_port == 10809
    assert settings.metrics_port == 9108


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("EXPORT_WORKER_NBD_CONF_DIR", "relative/conf.d"),
        ("EXPORT_WORKER_DEVICE_ROOTS", "dev"),
        ("EXPORT_WORKER_DATABASE_URL", "postgres://x/y"),
        ("EXPORT_WORKER_PREFETCH", "0"),
    ],
)
def test_bad_settings_are_refused(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()


def test_mask_url() -> None:
    assert mask_url("amqp://guest:guest@h:5672/") == "amqp://guest:***@h:5672/"
    assert mask_url("amqp://h/") == "amqp://h/"


def test_validation_errors_do_not_echo_input() -> None:
    with pytest.raises(ValidationError) as caught:
        parse_request(b'{"job_id": "j", "vm_id": "SECRET\\nVALUE"}')
    text = describe_validation_error(caught.value)
    assert text.startswith("vm_id:") or "; vm_id:" in text
    assert "SECRET" not in text
    assert "\n" not in text


def test_request_queue_is_a_quorum_queue_that_dead_letters() -> None:
    args = request_queue_arguments("q.dead", 5)
    assert args["x-queue-type"] == "quorum"
    assert args["x-dead-letter-routing-key"] == "q.dead"
    assert args["x-delivery-limit"] == 5


def test_split_statements_ignores_comments() -> None:
    sql = "-- header; with a semicolon\nCREATE TABLE a (x INT);\n\nCREATE TABLE b (y INT);\n"
    assert split_statements(sql) == ["CREATE TABLE a (x INT)", "CREATE TABLE b (y INT)"]


@pytest.mark.parametrize(
    ("errno", "kind"),
    [
        (1213, TransactionConflict),
        (1205, TransientDatabaseError),
        (2013, TransientDatabaseError),
        (2003, TransientDatabaseError),
        (1047, TransientDatabaseError),  # a Galera node rejoining its cluster
        (1146, TransactionConflict),  # beside another Galera node's ALTER (db_errors.py)
        (1054, DatabaseError),  # ER_BAD_FIELD_ERROR: a plain error
    ],
)
def test_translate_error(errno: int, kind: type[Exception]) -> None:
    error = translate_error(pymysql.err.OperationalError(errno, "x"))
    assert type(error) is kind
    assert error.retryable is (kind is not DatabaseError)


async def test_a_statement_retries_conflicts_only() -> None:
    """Conflicts clear in milliseconds; a lost connection is the job's retries' business."""
    for error, tries in ((TransactionConflict("deadlock"), 5), (TransientDatabaseError("x"), 1)):
        calls = 0

        async def fail(error: Exception = error) -> None:
            nonlocal calls
            async for attempt in retry_policy(attempts=5, max_wait_s=0.001):
                with attempt:
                    calls += 1
                    raise error

        with pytest.raises(type(error)):
            await fail()
        assert calls == tries


def test_database_name_is_validated() -> None:
    assert database_name(AnyUrl("mysql://root@h/nbd_exports")) == "nbd_exports"
    with pytest.raises(ValueError, match="database"):
        database_name(AnyUrl("mysql://root@h/bad-name"))


def test_dashboard_uses_only_metrics_the_worker_exports() -> None:
    import json
    import re

    from worker.metrics import build_metrics

    root = Path(__file__).resolve().parents[2]
    dashboard = json.loads((root / "deploy/grafana/nbd-export-worker.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for e in exprs for name in re.findall(r"\b(nbd_[a-z_]+)\b", e)}
    families = list(build_metrics("n").registry.collect())
    exported = {sample.name for family in families for sample in family.samples}
    # Labelled series appear only once used; derive their names from the families.
    exported |= {f"{f.name}_total" for f in families if f.type == "counter"}
    exported |= {f"{f.name}_bucket" for f in families if f.type == "histogram"}
    exported |= {f.name for f in families if f.type in ("gauge", "info")}
    assert used, "the dashboard queries nothing"
    assert used <= exported, used - exported


def test_unknown_variables_are_reported() -> None:
    environ = {"EXPORT_WORKER_DEVICE_ROOT": "/dev/disk/by-id", "EXPORT_WORKER_NODE_ID": "a"}
    assert Settings.unknown_variables(environ) == ["EXPORT_WORKER_DEVICE_ROOT"]


@pytest.mark.parametrize(
    ("failures", "error", "calls", "succeeds"),
    [
        (0, TransientDatabaseError, 1, True),
        (2, TransientDatabaseError, 3, True),
        (9, TransientDatabaseError, 4, False),  # four tries in all, the first included
        (9, DatabaseError, 1, False),  # not retryable
    ],
)
async def test_call_with_retries_counts_the_first_try(
    failures: int, error: type[Exception], calls: int, succeeds: bool
) -> None:
    made = 0

    async def fn() -> str:
        nonlocal made
        made += 1
        if made <= failures:
            raise error("x")
        return "ok"

    def policy() -> AsyncRetrying:
        return AsyncRetrying(stop=stop_after_attempt(4), reraise=True)

    def retryable(exc: BaseException) -> bool:
        return isinstance(exc, WorkerError) and exc.retryable

    if succeeds:
        assert await call_with_retries(fn, policy, retryable) == "ok"
    else:
        with pytest.raises(error):
            await call_with_retries(fn, policy, retryable)
    assert made == calls


async def test_an_ack_on_a_closed_channel_is_logged_and_counted_not_raised() -> None:
    from types import SimpleNamespace
    from typing import Any, cast

    from aiormq.exceptions import ChannelInvalidStateError

    from worker.consumer import JobConsumer, QueueConfig
    from worker.metrics import build_metrics

    metrics = build_metrics("n")
    channel = cast(Any, SimpleNamespace(is_closed=True))
    config = QueueConfig("q", "r", "x", "k", "n", 1, 1)
    consumer = JobConsumer(channel, cast(Any, None), cast(Any, None), metrics, config)
    message = cast(Any, SimpleNamespace(delivery_tag=7))

    async def stale_ack() -> None:
        raise ChannelInvalidStateError("writer is None")  # what a stale tag's ack raises

    assert await consumer._settle(message, "ack", stale_ack) is False
    assert metrics.registry.get_sample_value("nbd_export_settle_failures_total", {"node": "n"}) == 1


def test_a_flush_fsyncs_the_held_descriptor_and_the_device_the_link_opens_now(
    tmp_path: Path,
) -> None:
    first, second = tmp_path / "vdb", tmp_path / "vdc"
    first.write_bytes(b"a")
    second.write_bytes(b"b")
    link = tmp_path / "link"
    link.symlink_to(first)
    first_id = device_identity(first.stat())
    held = HeldDevices()
    held.put("e", first_id, open_device(link, first_id))
    assert held.holds("e", first_id)
    assert held.dup("e", device_identity(second.stat())) is None  # held for another device
    open_before = len(os.listdir("/proc/self/fd"))
    fsync_device(link, first_id, held.dup("e", first_id))
    assert len(os.listdir("/proc/self/fd")) == open_before  # the duplicate and the fresh one
    # The link re-pointed: the device it opens now is not the mapping's, nothing passes.
    link.unlink()
    link.symlink_to(second)
    with pytest.raises(FlushFailed, match=r"opens device file:"):
        fsync_device(link, first_id, held.dup("e", first_id))
    link.unlink()  # the volume detached
    with pytest.raises(FlushFailed) as gone:
        fsync_device(link, first_id, held.dup("e", first_id))
    assert gone.value.device_gone
    held.close()
    assert len(held) == 0
