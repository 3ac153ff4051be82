"""Access control: each export admits only its job's clients (a per-export authfile that
nbd-server reads on every connection), released exports admit nobody, and the server lists
its exports to nobody (allowlist = false) while the worker still verifies every export."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
from aio_pika.abc import AbstractConnection

from harness.nbd import (
    REP_ACK,
    REP_ERR_POLICY,
    NbdConnection,
    NbdServerProcess,
    go_reply,
)
from harness.sql import execute_sql
from harness.worker_process import env_for
from tests.conftest import (
    RunningWorker,
    Scheduler,
    job,
    make_disk,
    run_worker_cli,
    running_worker,
    scheduler_for,
)
from worker.metrics import build_metrics
from worker.nbd.files import ExportSpec, render_snippet, snippet_path
from worker.nbd.server import NbdServer
from worker.repository import Repository
from worker.service import reconcile_and_record
from worker.settings import Settings

pytestmark = pytest.mark.integration

#: Loopback addresses standing for copy tools on three different hosts.
TOOL_A, TOOL_B, STRANGER = "127.0.0.2", "127.0.0.3", "127.0.0.4"


def sighups(worker: RunningWorker) -> float:
    return worker.sample("nbd_server_sighups_total")


def authfile(settings: Settings, name: str) -> Path:
    return settings.auth_dir / f"{name}.allow"


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return run_worker_cli(*args, env=env_for(settings))


async def reconciled_drift(settings: Settings, kind: str) -> float | None:
    """One reconciliation as the worker runs it (start-up, periodic); the drift gauge of
    `kind` it leaves."""
    metrics = build_metrics("reconcile-test")
    repository = await Repository.connect(
        settings.database_url, node_id=settings.node_id, pool_size=2, timeout_s=5
    )
    server = NbdServer(settings, metrics)
    try:
        await reconcile_and_record(repository, server, metrics)
    finally:
        server.close()
        await repository.close()
    return metrics.registry.get_sample_value(
        "nbd_export_reconcile_drift", {"kind": kind, "node": "reconcile-test"}
    )


async def test_only_the_jobs_clients_connect_and_a_new_job_switches_them_without_sighup(
    worker: RunningWorker, scheduler: Scheduler, nbd_server: NbdServerProcess, disks_dir: Path
) -> None:
    disk = make_disk(disks_dir, "vdb", b"only for tool A")
    first = await scheduler.request(job(device=disk, client_addresses=[TOOL_A]))
    name = first["export_name"]
    assert first["action"] == "created"
    assert first["client_addresses"] == [TOOL_A]
    with NbdConnection(nbd_server.port, name, source=TOOL_A) as conn:
        assert conn.read(0, 15) == b"only for tool A"
    assert go_reply(nbd_server.port, name, source=TOOL_B) == REP_ERR_POLICY
    assert go_reply(nbd_server.port, name, source=STRANGER) == REP_ERR_POLICY
    mode = authfile(worker.settings, name).stat().st_mode
    assert stat.S_IMODE(mode) == 0o644  # the server's user (any) reads it; only we write
    snippet = snippet_path(worker.settings.nbd_conf_dir, name).read_text()
    assert f"authfile = {authfile(worker.settings, name)}" in snippet

    # The same disk for another copy tool (a retried copy from another host): reused, the
    # door switched over at once, and no SIGHUP.
    before = sighups(worker)
    second = await scheduler.request(job(vm_id=first["vm_id"], device=disk, client_addresses=[
        f"{TOOL_B}/32"  # another spelling of one host: normalized
    ]))  # fmt: skip
    assert second["action"] == "reused"
    assert second["reused"] is True
    assert second["client_addresses"] == [TOOL_B]
    assert sighups(worker) == before
    with NbdConnection(nbd_server.port, name, source=TOOL_B) as conn:
        assert conn.read(0, 15) == b"only for tool A"
    assert go_reply(nbd_server.port, name, source=TOOL_A) == REP_ERR_POLICY

    # A job without client_addresses gets the worker's default (loopback).
    third = await scheduler.request(job(vm_id=first["vm_id"], device=disk))
    assert third["action"] == "reused"
    assert third["client_addresses"] == ["127.0.0.1", "::1"]
    assert go_reply(nbd_server.port, name, source=TOOL_B) == REP_ERR_POLICY
    assert go_reply(nbd_server.port, name) == REP_ACK  # from 127.0.0.1
    assert sighups(worker) == before


async def test_a_tampered_authfile_is_put_right_by_the_next_job(
    worker: RunningWorker, scheduler: Scheduler, nbd_server: NbdServerProcess, disks_dir: Path
) -> None:
    request = job(device=make_disk(disks_dir, "t"), client_addresses=[TOOL_A])
    name = (await scheduler.request(request))["export_name"]
    door = authfile(worker.settings, name)
    door.write_text(door.read_text() + f"{STRANGER}/32\n")
    assert go_reply(nbd_server.port, name, source=STRANGER) == REP_ACK

    again = await scheduler.request({**request, "job_id": "again"})
    assert again["action"] == "reused"
    assert go_reply(nbd_server.port, name, source=STRANGER) == REP_ERR_POLICY
    assert go_reply(nbd_server.port, name, source=TOOL_A) == REP_ACK


async def test_release_refuses_new_connections_at_once_though_the_server_keeps_the_name(
    worker: RunningWorker, scheduler: Scheduler, nbd_server: NbdServerProcess, disks_dir: Path
) -> None:
    """A drain release fences at once (new connections refused, the established one keeps
    its device), and releases when the last client has left."""
    request = job(device=make_disk(disks_dir, "r", b"still here"), client_addresses=[TOOL_A])
    name = (await scheduler.request(request))["export_name"]
    held = NbdConnection(nbd_server.port, name, source=TOOL_A)
    try:
        corr = await scheduler.publish(
            {"type": "release-export", "job_id": "rel", "vm_id": request["vm_id"],
             "disk_unit_number": 0, "mode": "drain", "wait_s": 30}
        )  # fmt: skip
        for _ in range(200):  # fenced within moments: its authfile admits nobody
            if go_reply(nbd_server.port, name, source=TOOL_A) == REP_ERR_POLICY:
                break
            await asyncio.sleep(0.05)
        assert go_reply(nbd_server.port, name, source=TOOL_A) == REP_ERR_POLICY
        assert go_reply(nbd_server.port, name) == REP_ERR_POLICY  # the probe address too
        # A real client nobody here wrote is refused too.
        info = await asyncio.to_thread(
            subprocess.run,
            ["nbdinfo", f"nbd://127.0.0.1:{nbd_server.port}/{name}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert info.returncode != 0
        # An established connection keeps its device, and the release waits for it.
        assert held.read(0, 10) == b"still here"
        assert corr not in scheduler.replies
    finally:
        held.close()
    released = await scheduler.reply(corr)
    assert (released["status"], released["was_active"], released["mode"]) == (
        "released",
        True,
        "drain",
    )
    assert nbd_server.knows(name)  # a reload never removes a name
    # Emptied, not deleted: a missing authfile would admit everyone.
    lines = authfile(worker.settings, name).read_text().splitlines()
    assert [line for line in lines if not line.startswith("#")] == []


async def test_a_deleted_authfile_is_reported_then_restored_by_reconciliation(
    worker: RunningWorker, scheduler: Scheduler, nbd_server: NbdServerProcess, disks_dir: Path
) -> None:
    reply = await scheduler.request(
        job(device=make_disk(disks_dir, "d"), client_addresses=[TOOL_A])
    )
    name = reply["export_name"]
    authfile(worker.settings, name).unlink()
    # What a missing authfile means: nbd-server admits everyone.
    assert go_reply(nbd_server.port, name, source=STRANGER) == REP_ACK

    check = await asyncio.to_thread(cli, worker.settings, "check")
    assert check.returncode == 1
    failing = [line for line in check.stdout.splitlines() if line.startswith("FAIL")]
    assert any("authfile" in line and f"{name} (missing)" in line for line in failing), failing
    dry = await asyncio.to_thread(cli, worker.settings, "reconcile", "--dry-run")
    assert f"  {name} (missing)" in dry.stdout
    assert authfile(worker.settings, name).exists() is False  # a dry run changes nothing

    # The worker's own reconciliation (start-up, periodic): reported on the drift gauge.
    assert await reconciled_drift(worker.settings, "authfile") == 1
    assert go_reply(nbd_server.port, name, source=STRANGER) == REP_ERR_POLICY
    assert go_reply(nbd_server.port, name, source=TOOL_A) == REP_ACK
    after = await asyncio.to_thread(cli, worker.settings, "check")
    assert after.returncode == 0, after.stdout


@pytest.mark.slow  # a thousand reuses
async def test_without_listing_every_operation_works(
    worker: RunningWorker, scheduler: Scheduler, nbd_server: NbdServerProcess, disks_dir: Path
) -> None:
    assert not nbd_server.allowlist
    first = make_disk(disks_dir, "first", b"first device")
    request = job(device=first)
    created = await scheduler.request(request)
    assert created["action"] == "created"
    name = created["export_name"]
    # The server lists nothing to anyone, the worker's own probes included.
    listing = await asyncio.to_thread(
        subprocess.run,
        ["nbd-client", "-l", "127.0.0.1", str(nbd_server.port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert listing.returncode != 0
    assert name not in listing.stdout

    corrs = [await scheduler.publish({**request, "job_id": f"reuse-{i}"}) for i in range(1000)]
    replies = await asyncio.gather(*(scheduler.reply(c, timeout_s=120) for c in corrs))
    assert {r["action"] for r in replies} == {"reused"}
    assert sighups(worker) == 1

    second = make_disk(disks_dir, "second", b"second device")
    relinked = await scheduler.request({**request, "job_id": "relink", "device_path": str(second)})
    assert relinked["action"] == "relinked"
    with NbdConnection(nbd_server.port, name) as conn:
        assert conn.read(0, 13) == b"second device"

    status = await asyncio.to_thread(cli, worker.settings, "status", "--json")
    assert status.returncode == 0, status.stderr
    (row,) = json.loads(status.stdout)
    assert row["known"] is True
    assert row["servable"] is True
    assert row["authfile"] == "ok"
    assert row["protected"] is True
    assert row["client_addresses"] == ["127.0.0.1", "::1"]
    check = await asyncio.to_thread(cli, worker.settings, "check")
    assert check.returncode == 0, check.stdout
    assert "allowlist" not in check.stdout

    nbd_server.stop()
    for snippet in worker.settings.nbd_conf_dir.glob("*.conf"):
        snippet.unlink()
    nbd_server.start()
    assert not nbd_server.knows(name)
    reconciled = await asyncio.to_thread(cli, worker.settings, "reconcile")
    assert reconciled.returncode == 0, reconciled.stderr
    assert f"exports added: 1\n  {name}" in reconciled.stdout
    assert "SIGHUP sent: yes" in reconciled.stdout
    assert nbd_server.knows(name)
    with NbdConnection(nbd_server.port, name) as conn:
        assert conn.read(0, 13) == b"second device"

    nbd_server.stop()
    for snippet in worker.settings.nbd_conf_dir.glob("*.conf"):
        snippet.unlink()
    nbd_server.start()
    recreated = await scheduler.request({**request, "job_id": "after-restart",
                                         "device_path": str(second)})  # fmt: skip
    assert recreated["action"] == "recreated"

    released = await scheduler.request(
        {"type": "release-export", "job_id": "rel", "vm_id": request["vm_id"],
         "disk_unit_number": 0}
    )  # fmt: skip
    assert released["was_active"] is True
    assert go_reply(nbd_server.port, name) == REP_ERR_POLICY
    stuck = await asyncio.to_thread(cli, worker.settings, "reconcile", "--dry-run")
    assert f"exports stuck in the server's memory (a restart clears them): 1\n  {name}" in (
        stuck.stdout
    )


async def test_an_export_loaded_without_an_authfile_line_is_named_unprotected(
    settings: Settings, amqp: AbstractConnection, nbd_server: NbdServerProcess, disks_dir: Path
) -> None:
    request = job(device=make_disk(disks_dir, "old"), client_addresses=[TOOL_A])
    async with running_worker(settings):
        scheduler = await scheduler_for(amqp, settings)
        name = (await scheduler.request(request))["export_name"]
        await scheduler.channel.close()
    # As a worker from before access control left it: a snippet without an authfile line,
    # which the server loads at its next start.
    old = ExportSpec(name=name, link_path=settings.link_dir / name)
    snippet_path(settings.nbd_conf_dir, name).write_text(render_snippet(old))
    nbd_server.stop()
    nbd_server.start()
    assert go_reply(nbd_server.port, name, source=STRANGER) == REP_ACK  # the danger

    status = await asyncio.to_thread(cli, settings, "status")
    assert status.returncode == 0, status.stderr
    (line,) = [line for line in status.stdout.splitlines() if line.startswith(name)]
    assert "UNPROTECTED" in line
    check = await asyncio.to_thread(cli, settings, "check")
    assert check.returncode == 1
    assert any(
        line.startswith("FAIL no export admits everyone") and name in line
        for line in check.stdout.splitlines()
    ), check.stdout

    assert await reconciled_drift(settings, "unprotected") == 1
    # Reconciliation rewrote the snippet: the next start of nbd-server protects it.
    assert "authfile = " in snippet_path(settings.nbd_conf_dir, name).read_text()
    nbd_server.stop()
    nbd_server.start()
    assert go_reply(nbd_server.port, name, source=STRANGER) == REP_ERR_POLICY
    again = await asyncio.to_thread(cli, settings, "status", "--json")
    (row,) = json.loads(again.stdout)
    assert row["protected"] is True


@pytest.mark.parametrize(
    "hostile",
    [
        ["127.0.0.1\n0.0.0.0/0"],
        ["127.0.0.1 # everyone"],
        ["#"],
        ["[::1]"],
        ["::1]"],
        ["fe80::1%eth0"],
        ["localhost"],
        ["copy-host.example"],
        ["10.0.0.5/24"],
        ["/etc/passwd"],
        ["127.0.0.1/33"],
        [1, 2],
        [None],
        [["127.0.0.1"]],
        [{"address": "127.0.0.1"}],
        "127.0.0.1",
        {"127.0.0.1": True},
        [],
        ["127.0.0.1"] * 17,
        [f"10.0.{i // 256}.{i % 256}" for i in range(10_000)],
    ],
    ids=lambda value: repr(value)[:40],
)
async def test_hostile_client_addresses_are_invalid_and_reach_no_file(
    worker: RunningWorker, scheduler: Scheduler, disks_dir: Path, hostile: object
) -> None:
    reply = await scheduler.request(job(device=make_disk(disks_dir, "h"), client_addresses=hostile))
    assert reply["status"] == "error"
    assert reply["error"]["code"] == "invalid_request"
    message = reply["error"]["message"]
    # 10,000 entries are refused before parsing: the body is over the size limit.
    assert "client_addresses" in message or "the limit is" in message
    assert list(worker.settings.auth_dir.iterdir()) == []
    assert list(worker.settings.nbd_conf_dir.glob("*.conf")) == []
    assert not os.listdir(worker.settings.link_dir)


async def test_releasing_what_was_never_prepared_writes_no_authfile(
    worker: RunningWorker, scheduler: Scheduler
) -> None:
    released = await scheduler.request(
        {"type": "release-export", "job_id": "never", "disk_unit_number": 3,
         "vm_id": "4205784a-098a-40f1-1f1e-a5cd2597fd59"}
    )  # fmt: skip
    assert released["was_active"] is False
    assert list(worker.settings.auth_dir.iterdir()) == []


async def test_a_corrupt_address_column_closes_the_export_rather_than_guess(
    worker: RunningWorker, scheduler: Scheduler, nbd_server: NbdServerProcess, disks_dir: Path
) -> None:
    request = job(device=make_disk(disks_dir, "c"), client_addresses=[TOOL_A])
    name = (await scheduler.request(request))["export_name"]
    await execute_sql(
        worker.settings.database_url,
        "UPDATE vm_export_mappings SET client_addresses = '0.0.0.0/0\\n#' "
        f"WHERE export_name = '{name}'",
    )
    reconciled = await asyncio.to_thread(cli, worker.settings, "reconcile")
    assert reconciled.returncode == 0, reconciled.stderr
    assert f"  {name} (invalid client_addresses)" in reconciled.stdout
    assert go_reply(nbd_server.port, name, source=TOOL_A) == REP_ERR_POLICY
    assert "0.0.0.0" not in authfile(worker.settings, name).read_text()
    # A job naming its clients again repairs the row and opens the export to them.
    again = await scheduler.request({**request, "job_id": "again"})
    assert again["action"] == "reused"
    assert go_reply(nbd_server.port, name, source=TOOL_A) == REP_ACK
