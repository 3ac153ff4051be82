"""Start-up and the command line: the version gate, `run` as a process, `migrate`."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import aiomysql
import pymysql
import pytest
from aio_pika.abc import AbstractConnection
from pydantic import AnyUrl

from harness.nbd import OLD_SERVER_BIN, NbdServerProcess
from harness.sql import execute_sql
from harness.worker_process import env_for
from tests.conftest import (
    MYSQL_URL,
    NODE,
    RunningWorker,
    Scheduler,
    clean_environ,
    job,
    make_disk,
    run_worker_cli,
    unique,
)
from worker.errors import UnsupportedServer
from worker.repository import migrate
from worker.service import serve
from worker.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture
def old_server(tmp_path: Path) -> NbdServerProcess:
    assert OLD_SERVER_BIN.exists(), "run scripts/install-system-deps.sh --with-old-server"
    server = NbdServerProcess(tmp_path / "old", binary=str(OLD_SERVER_BIN))
    server.root.mkdir()
    return server


async def test_server_older_than_3_25_is_refused_with_the_reason(
    old_server: NbdServerProcess, settings: Settings
) -> None:
    old_server.start()
    try:
        old = settings.model_copy(
            update={
                "nbd_config_file": old_server.config_file,
                "nbd_pid_file": old_server.pid_file,
                "nbd_conf_dir": old_server.conf_dir,
                "nbd_port": old_server.port,
            }
        )
        with pytest.raises(UnsupportedServer) as caught:
            await serve(old, asyncio.Event())
        message = str(caught.value)
        assert "nbd-server 3.24" in message
        assert "SIGHUP" in message
        assert "3.25" in message

        # The command line says so too, with its own exit code, and sends no signal.
        proc = await asyncio.to_thread(run_worker_cli, "run", env=env_for(old))
        assert proc.returncode == 3, proc.stderr
        assert "nbd-server 3.24" in proc.stderr
        assert "corrupt their heap on SIGHUP" in proc.stderr
        assert old_server.pid_file.read_text().strip() == str(old_server.pid)
        assert old_server.knows("placeholder")
        assert not list(old_server.conf_dir.glob("*.conf"))
    finally:
        old_server.stop()


@pytest.mark.parametrize("event_loop", ["auto", "asyncio"])
async def test_run_as_a_process_serves_jobs_and_exits_cleanly_on_sigterm(
    settings: Settings,
    amqp: AbstractConnection,
    disks_dir: Path,
    nbd_server: NbdServerProcess,
    event_loop: str,
) -> None:
    """On the loop EXPORT_WORKER_EVENT_LOOP asks for: uvloop by default (the set-up installs
    the `fast` extra), asyncio's own when told, a create and a reuse each."""
    env = {**env_for(settings), "EXPORT_WORKER_EVENT_LOOP": event_loop}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "run", env=env, stderr=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stderr is not None
        while True:
            line = await asyncio.wait_for(proc.stderr.readline(), 30)
            assert line, "worker exited before it was ready"
            if b"Worker ready" in line:
                break
        assert line.rstrip().endswith(b"loop=uvloop" if event_loop == "auto" else b"loop=asyncio")
        channel = await amqp.channel()
        scheduler = Scheduler(channel, settings.request_queue)
        await scheduler.start()
        first = job(device=make_disk(disks_dir, f"proc-{event_loop}"))
        reply = await scheduler.request(first)
        assert reply["action"] == "created"
        assert nbd_server.knows(reply["export_name"])
        again = await scheduler.request({**first, "job_id": unique("job")})
        assert (again["action"], again["export_name"]) == ("reused", reply["export_name"])
        await channel.close()
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 30)
    assert code == 0


async def test_migrate_creates_the_database_and_is_idempotent() -> None:
    name = unique("nbdmigrate")
    url = AnyUrl(f"{MYSQL_URL}/{name}")
    try:
        assert await migrate(url, node_id=NODE, timeout_s=5) == [
            "0001_vm_export_mappings.sql",
            "0002_node_id.sql",
            "0003_export_jobs.sql",
            "0004_flush_error.sql",
            "0005_client_addresses.sql",
            "0006_export_usage.sql",
            "0007_leases.sql",
            "0008_export_checksums.sql",
        ]
        assert await migrate(url, node_id=NODE, timeout_s=5) == []
        conn = await aiomysql.connect(host=url.host, port=url.port or 3306, user="root", db=name)
        try:
            async with conn.cursor() as cur:
                insert = (
                    "INSERT INTO vm_export_mappings (node_id, vm_id, disk_unit_number, vm_name, "
                    "export_name, device_path, device_id, status) "
                    "VALUES (%s, %s, %s, 'vm', %s, %s, %s, %s)"
                )
                dev = "blk:8:16"
                await cur.execute(insert, ("a", "a" * 36, 0, "e0", "/dev/vdb", dev, "inactive"))
                await cur.execute(insert, ("a", "b" * 36, 0, "e1", "/dev/vdb", dev, "active"))
                # Two inactive rows may name one device; two active rows may not, whatever
                # path names it...
                await cur.execute(insert, ("a", "c" * 36, 0, "e2", "/dev/vdb", dev, "inactive"))
                with pytest.raises(pymysql.err.IntegrityError, match="active_device_id"):
                    await cur.execute(
                        insert, ("a", "d" * 36, 0, "e3", "/dev/disk/by-id/x", dev, "active")
                    )
                with pytest.raises(pymysql.err.IntegrityError, match="vm_disk"):
                    await cur.execute(insert, ("a", "a" * 36, 0, "e4", "/dev/vdc", "x", "active"))
                # ...on one node: another appliance has its own devices, exports and disks.
                await cur.execute(insert, ("b", "d" * 36, 0, "e3", "/dev/vdb", dev, "active"))
                await cur.execute(insert, ("b", "a" * 36, 0, "e0", "/dev/vdc", "y", "active"))
        finally:
            conn.close()
    finally:
        await execute_sql(AnyUrl(MYSQL_URL), f"DROP DATABASE IF EXISTS `{name}`")


def test_migrate_command_exit_code_and_output() -> None:
    name = unique("nbdcli")
    env = clean_environ(EXPORT_WORKER_DATABASE_URL=f"{MYSQL_URL}/{name}")
    try:
        first = run_worker_cli("migrate", env=env)
        assert first.returncode == 0, first.stderr
        assert "applied 8 migration(s): 0001_vm_export_mappings.sql, 0002_node_id.sql, " in (
            first.stdout
        )
        again = run_worker_cli("migrate", env=env)
        assert again.returncode == 0
        assert "applied 0 migration(s)" in again.stdout
    finally:
        conn = pymysql.connect(host="127.0.0.1", user="root")
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        conn.close()


async def test_request_command_prints_the_reply(
    worker: RunningWorker, disks_dir: Path, nbd_server: NbdServerProcess
) -> None:
    disk = make_disk(disks_dir, "cli")
    vm = "4205784a-098a-40f1-1f1e-a5cd2597fd59"
    argv = ["request", "--vm-id", vm, "--vm-name", "pgtest2", "--disk", "1"]
    argv += ["--device", str(disk), "--job-id", "cli-1", "--timeout", "30"]
    env = env_for(worker.settings)
    proc = await asyncio.to_thread(run_worker_cli, *argv, env=env)
    assert proc.returncode == 0, proc.stderr
    reply = json.loads(proc.stdout)
    assert reply["job_id"] == "cli-1"
    assert reply["action"] == "created"
    assert reply["export_name"] == f"migration-vm-{vm}-disk1"

    # The same job again is answered from its record, whatever its device now.
    argv[argv.index(str(disk))] = str(disks_dir / "absent")
    again = await asyncio.to_thread(run_worker_cli, *argv, env=env)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == reply

    argv[argv.index("cli-1")] = "cli-2"
    proc = await asyncio.to_thread(run_worker_cli, *argv, env=env)
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["error"]["code"] == "device_not_found"


@pytest.mark.parametrize("directory", ["auth_dir", "link_dir"])
async def test_a_directory_run_cannot_create_is_one_clear_error(
    settings: Settings, tmp_path: Path, directory: str
) -> None:
    """The image once lacked a writable parent of the authfile directory: `run` died with
    a traceback, which a container's restart loop repeats forever."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    broken = settings.model_copy(update={directory: blocker / "sub"})
    proc = await asyncio.to_thread(run_worker_cli, "run", env=env_for(broken))
    assert proc.returncode == 1, proc.stderr
    assert f"Cannot start: cannot create {blocker / 'sub'}: Not a directory" in proc.stderr
    assert "Traceback" not in proc.stderr
