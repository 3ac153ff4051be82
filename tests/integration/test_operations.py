"""Operations: the ops endpoint, logs, the operator commands and the deployment files.

Over 400 lines (budget 500) as one capability's tests: what an operator runs and reads.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from aio_pika.abc import AbstractConnection

from harness.nbd import NbdConnection, NbdError, NbdServerProcess, free_port
from harness.worker_process import env_for
from tests.conftest import (
    RunningWorker,
    Scheduler,
    clean_environ,
    job,
    make_disk,
    run_worker_cli,
    running_worker,
    scheduler_for,
)
from worker.settings import Settings

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PROMTOOL = Path("/var/cache/nbd-export-worker/prometheus/usr/bin/promtool")


def http_get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return run_worker_cli(*args, env=env_for(settings))


async def test_metrics_health_and_readiness_endpoints(
    settings: Settings, amqp: AbstractConnection, nbd_server: NbdServerProcess, disks_dir: Path
) -> None:
    port = free_port()
    live = settings.model_copy(update={"metrics_port": port, "metrics_host": "127.0.0.1"})
    async with running_worker(live) as worker:
        channel = await amqp.channel()
        scheduler = Scheduler(channel, live.request_queue)
        await scheduler.start()
        await scheduler.request(job(device=make_disk(disks_dir, "m")))
        await scheduler.request(b"not json")
        await channel.close()
        await worker.settled_sample("nbd_export_jobs_total", {"outcome": "failed"}, 1)

        status, body = await asyncio.to_thread(http_get, port, "/metrics")
        assert status == 200
        text = body.decode()
        node = 'node="test-node"'
        for name in (
            f'nbd_export_jobs_total{{{node},outcome="created"}} 1.0',
            f'nbd_export_jobs_total{{{node},outcome="failed"}} 1.0',
            f"nbd_server_sighups_total{{{node}}} 1.0",
            f'nbd_export_dead_lettered_total{{code="invalid_request",{node}}} 1.0',
            f"nbd_export_job_duration_seconds_count{{{node}}} 2.0",
            f"nbd_server_main_pid{{{node}}} {float(nbd_server.pid)}",
            f'nbd_server_info{{{node},pid="{nbd_server.pid}",version="3.26.1"}} 1.0',
            f"nbd_server_reload_visible_seconds_count{{{node}}} 1.0",
            f"nbd_export_config_lock_wait_seconds_count{{{node}}} 1.0",
            f"nbd_server_data_path_ok{{{node}}} 1.0",
            f'nbd_server_self_tests_total{{{node},result="passed"}} 1.0',
        ):
            assert name in text, name
        assert PROMTOOL.exists(), "run scripts/install-system-deps.sh --with-test-tools"
        check = subprocess.run(
            [str(PROMTOOL), "check", "metrics"], input=body, capture_output=True, timeout=30
        )
        assert check.returncode == 0, check.stdout + check.stderr

        status, body = await asyncio.to_thread(http_get, port, "/healthz")
        assert (status, json.loads(body)) == (200, {"status": "ok"})
        status, body = await asyncio.to_thread(http_get, port, "/readyz")
        assert status == 200
        assert json.loads(body) == {
            "status": "ok",
            "checks": {"broker": "ok", "database": "ok", "nbd_server": "ok", "nbd_data_path": "ok"},
        }

        nbd_server.stop()
        await asyncio.sleep(2.1)  # readiness results are cached for 2 s
        status, body = await asyncio.to_thread(http_get, port, "/readyz")
        assert status == 503
        payload = json.loads(body)
        assert payload["status"] == "fail"
        assert payload["checks"]["nbd_server"] != "ok"
        assert payload["checks"]["database"] == "ok"
        status, _ = await asyncio.to_thread(http_get, port, "/healthz")
        assert status == 200, "a down nbd-server is not a dead worker"
        nbd_server.start()
        await asyncio.sleep(2.1)
        status, _ = await asyncio.to_thread(http_get, port, "/readyz")
        assert status == 200


async def test_json_logs_carry_the_job_fields(
    settings: Settings, disks_dir: Path, amqp: AbstractConnection
) -> None:
    env = {**env_for(settings), "EXPORT_WORKER_LOG_FORMAT": "json"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "run", env=env, stderr=asyncio.subprocess.PIPE
    )
    lines: list[dict[str, object]] = []
    try:
        assert proc.stderr is not None
        while not any("Worker ready" in str(line.get("message")) for line in lines):
            raw = await asyncio.wait_for(proc.stderr.readline(), 30)
            assert raw, "worker exited"
            lines.append(json.loads(raw))
        channel = await amqp.channel()
        scheduler = Scheduler(channel, settings.request_queue)
        await scheduler.start()
        request = job(device=make_disk(disks_dir, "logged"))
        corr = await scheduler.publish(request)
        await scheduler.reply(corr)
        await channel.close()
        while not any("Export ready" in str(line.get("message")) for line in lines):
            raw = await asyncio.wait_for(proc.stderr.readline(), 30)
            lines.append(json.loads(raw))
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)
    by_message = {str(line["message"]).split(" job_id=")[0]: line for line in lines}
    created = by_message["Creating new VM export mapping"]
    assert created["job_id"] == request["job_id"]
    assert created["vm_id"] == request["vm_id"]
    assert created["disk"] == 0
    assert created["correlation_id"] == corr
    assert created["export_name"] == f"migration-vm-{request['vm_id']}-disk0"
    assert by_message["Export ready"]["outcome"] == "created"
    assert any(
        str(line["message"]).startswith("Added dynamic export to NBD config") for line in lines
    )
    assert all(line["level"] in ("info", "warning") for line in lines)


async def test_status_release_and_reconcile_commands(
    worker: RunningWorker,
    scheduler: Scheduler,
    settings: Settings,
    nbd_server: NbdServerProcess,
    disks_dir: Path,
) -> None:
    a = await scheduler.request(job(device=make_disk(disks_dir, "a", b"AAAA")))
    b_job = job(device=make_disk(disks_dir, "b", b"BBBB"), disk=3)
    b = await scheduler.request(b_job)

    proc = await asyncio.to_thread(cli, settings, "status", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {row["export_name"]: row for row in json.loads(proc.stdout)}
    assert set(rows) == {a["export_name"], b["export_name"]}
    assert rows[a["export_name"]]["known"] is True
    assert rows[a["export_name"]]["servable"] is True
    assert rows[a["export_name"]]["size_bytes"] == 16 * 1024 * 1024
    assert rows[a["export_name"]]["link_target"] == a["device_path"]
    assert rows[a["export_name"]]["device_present"] is True
    # As the server advertises it (NBD_OPT_GO's transmission flags).
    assert rows[a["export_name"]]["data_path"] == {
        "read_only": False,
        "can_flush": True,
        "can_fua": True,
        "can_trim": True,
        "can_zero": True,
        "can_multi_conn": True,
    }
    table = await asyncio.to_thread(cli, settings, "status")
    assert a["export_name"] in table.stdout
    assert "servable" in table.stdout
    assert "flush,fua,trim,zero,multi-conn" in table.stdout

    proc = await asyncio.to_thread(
        cli, settings, "release", "--vm-id", b_job["vm_id"], "--disk", "3"
    )
    assert proc.returncode == 0, proc.stderr
    released = json.loads(proc.stdout)
    assert (released["export_name"], released["status"], released["was_active"]) == (
        b["export_name"],
        "released",
        True,
    )
    assert not (settings.link_dir / b["export_name"]).exists()
    assert not (settings.nbd_conf_dir / f"{b['export_name']}.conf").exists()
    with pytest.raises(NbdError):
        NbdConnection(nbd_server.port, b["export_name"])

    # Damage: a's link and snippet gone, and the server restarted without them.
    (settings.link_dir / a["export_name"]).unlink()
    (settings.nbd_conf_dir / f"{a['export_name']}.conf").unlink()
    nbd_server.stop()
    nbd_server.start()
    dry = await asyncio.to_thread(cli, settings, "reconcile", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"links to rewrite: 1\n  {a['export_name']}\n" in dry.stdout
    assert f"exports to add: 1\n  {a['export_name']}\n" in dry.stdout
    assert "exports stuck in the server's memory (a restart clears them): 0" in dry.stdout
    assert "SIGHUP sent: no" in dry.stdout
    assert not (settings.link_dir / a["export_name"]).exists(), "a dry run changes nothing"

    done = await asyncio.to_thread(cli, settings, "reconcile")
    assert done.returncode == 0, done.stderr
    assert f"links rewritten: 1\n  {a['export_name']}\n" in done.stdout
    assert "SIGHUP sent: yes" in done.stdout
    with NbdConnection(nbd_server.port, a["export_name"]) as conn:
        assert conn.read(0, 4) == b"AAAA"
    again = await asyncio.to_thread(cli, settings, "reconcile")
    assert "SIGHUP sent: no" in again.stdout

    # A prepare-export after the release brings the disk back.
    back = await scheduler.request({**b_job, "job_id": "back"})
    assert back["status"] == "ready"
    with NbdConnection(nbd_server.port, b["export_name"]) as conn:
        assert conn.read(0, 4) == b"BBBB"


async def test_check_command_lists_every_problem(
    settings: Settings, nbd_server: NbdServerProcess
) -> None:
    settings.link_dir.mkdir(parents=True, exist_ok=True)
    settings.auth_dir.mkdir(parents=True, exist_ok=True)
    ok = await asyncio.to_thread(cli, settings, "check")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "FAIL" not in ok.stdout
    assert "warn" not in ok.stdout  # allowlist = false, listenaddr = 127.0.0.1
    assert "version 3.26.1" in ok.stdout
    assert "ok   nbd-server data path (self-test of its binary)" in ok.stdout

    broken = settings.model_copy(
        update={
            "nbd_conf_dir": nbd_server.root / "elsewhere",
            "amqp_url": f"amqp://guest:guest@127.0.0.1:{free_port()}/",
        }
    )
    nbd_server.config_file.write_text(
        nbd_server.config_file.read_text()
        .replace("allowlist = false", "allowlist = true")
        .replace("listenaddr = 127.0.0.1", "")
    )
    bad = await asyncio.to_thread(cli, broken, "check")
    assert bad.returncode == 1
    failures = [line for line in bad.stdout.splitlines() if line.startswith("FAIL")]
    warnings = [line for line in bad.stdout.splitlines() if line.startswith("warn")]
    assert any("allowlist = true" in line and "lists every export" in line for line in warnings)
    assert any("no listenaddr" in line for line in warnings)
    assert any("includedir" in line for line in failures)
    assert any("broker" in line for line in failures)
    assert any("elsewhere" in line and "writable" in line for line in failures)
    assert "guest:guest" not in bad.stdout


def test_compose_file_is_valid() -> None:
    """With what an operator must set (test_containers.py runs it)."""
    proc = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=clean_environ(
            EXPORT_WORKER_NODE_ID="appliance-1", EXPORT_WORKER_NBD_ADVERTISE_HOST="192.0.2.10"
        ),
    )
    assert proc.returncode == 0, proc.stderr


def test_every_cli_command_has_help() -> None:
    commands = (
        "run",
        "migrate",
        "status",
        "reconcile",
        "request",
        "release",
        "check",
        "healthcheck",
    )
    every = (*commands, "show-config", "schemas")
    # Ten interpreters that only import and print: started together, not one after another.
    with ThreadPoolExecutor(len(every)) as pool:
        procs = list(pool.map(lambda c: run_worker_cli(c, "--help", env=clean_environ()), every))
    for command, proc in zip(every, procs, strict=True):
        assert proc.returncode == 0
        assert "usage: nbd-export-worker " + command in proc.stdout


@pytest.mark.parametrize("unit", ["nbd-server.service", "nbd-export-worker.service"])
def test_systemd_units_verify(unit: str, tmp_path: Path) -> None:
    text = (ROOT / "deploy/systemd" / unit).read_text()
    # The unit names the production install path; point it at this checkout's install.
    entry = Path(sys.executable).parent / "nbd-export-worker"
    text = text.replace("/opt/nbd-export-worker/bin/nbd-export-worker", str(entry))
    (tmp_path / unit).write_text(text)
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    problems = [
        line
        for line in (proc.stdout + proc.stderr).splitlines()
        # Units it merely refers to (rabbitmq-server, mariadb) need not exist here.
        if line.strip() and "not found" not in line
    ]
    assert problems == [], problems
    assert "ExecReload=/bin/kill -HUP $MAINPID" in text or unit != "nbd-server.service"


def test_show_config_masks_secrets() -> None:
    env = clean_environ(
        EXPORT_WORKER_AMQP_URL="amqp://u:s3cret@one:5672/,amqp://u:s3cret@two:5672/",
        EXPORT_WORKER_DATABASE_URL="mysql://db:s3cret@h:3306/x",
    )
    proc = run_worker_cli("show-config", env=env)
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert "s3cret" not in proc.stdout
    assert shown["amqp_url"] == "amqp://u:***@one:5672/,amqp://u:***@two:5672/"
    typo = run_worker_cli("show-config", env={**env, "EXPORT_WORKER_DEVICE_ROOT": "/dev"})
    assert typo.returncode == 2
    assert "EXPORT_WORKER_DEVICE_ROOT" in typo.stderr


async def test_dead_letters_are_listed_in_place_and_replayed(
    settings: Settings, amqp: AbstractConnection, nbd_server: NbdServerProcess, disks_dir: Path
) -> None:
    fast = settings.model_copy(update={"probe": "native", "probe_timeout_s": 0.5})
    request = job(device=make_disk(disks_dir, "dl", b"dead"))
    async with running_worker(fast):
        scheduler = await scheduler_for(amqp, fast)
        os.kill(nbd_server.pid, signal.SIGSTOP)  # hung: the job exhausts its retries
        try:
            corr = await scheduler.publish(request)
            failed = await scheduler.reply(corr, timeout_s=60)
        finally:
            os.kill(nbd_server.pid, signal.SIGCONT)
        assert failed["error"]["code"] == "retries_exhausted"
        # The reject follows the reply: wait until the dead letter is there.
        dead = await scheduler.channel.declare_queue(f"{fast.request_queue}.dead", passive=True)
        while not (dead.declaration_result.message_count or 0):
            await asyncio.sleep(0.02)
            dead = await scheduler.channel.declare_queue(f"{fast.request_queue}.dead", passive=True)

        listed = [await asyncio.to_thread(cli, fast, "dead-letters", "--json") for _ in range(2)]
        for proc in listed:
            assert proc.returncode == 0, proc.stderr
            letters = json.loads(proc.stdout)
            assert [(d["job_id"], d["reason"]) for d in letters] == [
                (request["job_id"], "rejected")
            ]
            assert letters[0]["correlation_id"] == corr

        # The cause is gone: replayed, the job is served and answered to its scheduler.
        replay = await asyncio.to_thread(cli, fast, "dead-letters", "--replay")
        assert replay.returncode == 0, replay.stderr
        assert "1 dead letter(s) replayed" in replay.stdout
        deadline = asyncio.get_running_loop().time() + 30
        while scheduler.replies[corr]["status"] != "ready":
            assert asyncio.get_running_loop().time() < deadline, scheduler.replies[corr]
            await asyncio.sleep(0.05)
        empty = await asyncio.to_thread(cli, fast, "dead-letters")
        await scheduler.channel.close()
    assert "0 dead letter(s) in" in empty.stdout
    with NbdConnection(nbd_server.port, scheduler.replies[corr]["export_name"]) as conn:
        assert conn.read(0, 4) == b"dead"


async def test_status_and_inspect_show_who_is_connected(
    worker: RunningWorker,
    scheduler: Scheduler,
    settings: Settings,
    nbd_server: NbdServerProcess,
    disks_dir: Path,
) -> None:
    """The live view from the command line: `status` gains connections, written and idle
    (all of it in --json), `inspect` answers as an inspect-export job does; a disk never
    prepared here is said to be unknown (exit 1)."""
    a_job = job(device=make_disk(disks_dir, "a", b"AAAA"))
    a = await scheduler.request(a_job)
    with NbdConnection(nbd_server.port, a["export_name"]) as held:
        assert held.read(0, 4) == b"AAAA"
        proc = await asyncio.to_thread(cli, settings, "status", "--json")
        assert proc.returncode == 0, proc.stderr
        (row,) = json.loads(proc.stdout)
        live = row["live"]
        assert [c["client_address"] for c in live["connections"]] == ["127.0.0.1"]
        assert live["device_size"] == 16 * 1024 * 1024
        assert live["bytes_written"] <= 4096  # at most the page its read's atime dirtied
        table = await asyncio.to_thread(cli, settings, "status")
        header, line = table.stdout.splitlines()
        assert header.split()[-3:] == ["connections", "written", "idle"]
        assert line.split()[-3:-1] == ["1", "0"]

        proc = await asyncio.to_thread(
            cli, settings, "inspect", "--vm-id", a_job["vm_id"], "--disk", "0"
        )
        assert proc.returncode == 0, proc.stderr
        status = json.loads(proc.stdout)
        assert (status["status"], status["export_status"]) == ("inspected", "active")
        assert status["device_path"] == a["device_path"]
        assert status["client_addresses"] == a["client_addresses"]
        assert len(status["live"]["connections"]) == 1
        assert status["live"]["connections"][0]["device"] == "current"

    unknown = await asyncio.to_thread(
        cli, settings, "inspect", "--vm-id", job()["vm_id"], "--disk", "0"
    )
    assert unknown.returncode == 1
    assert json.loads(unknown.stdout)["export_status"] == "unknown"
    assert "unknown on this node" in unknown.stderr


async def test_release_command_modes(
    worker: RunningWorker,
    scheduler: Scheduler,
    settings: Settings,
    nbd_server: NbdServerProcess,
    disks_dir: Path,
) -> None:
    """`release` with a client connected: safe (the default) changes nothing and exits 1
    naming the connection; force cuts it (only it) and releases."""
    a_job = job(device=make_disk(disks_dir, "a", b"AAAA"))
    a = await scheduler.request(a_job)
    b = await scheduler.request(job(device=make_disk(disks_dir, "b", b"BBBB")))
    other = NbdConnection(nbd_server.port, b["export_name"])
    held = NbdConnection(nbd_server.port, a["export_name"])
    try:
        args = ("release", "--vm-id", a_job["vm_id"], "--disk", "0")
        safe = await asyncio.to_thread(cli, settings, *args)
        assert safe.returncode == 1, safe.stderr
        assert "export_in_use" in safe.stderr
        assert [c["client_address"] for c in json.loads(safe.stdout)] == ["127.0.0.1"]
        assert held.read(0, 4) == b"AAAA"

        forced = await asyncio.to_thread(cli, settings, *args, "--mode", "force")
        assert forced.returncode == 0, forced.stderr
        released = json.loads(forced.stdout)
        assert (released["status"], released["mode"], released["cut"]) == ("released", "force", 1)
        with pytest.raises((NbdError, OSError)):
            held.read(0, 4)
        assert other.read(0, 4) == b"BBBB", "another export's client is untouched"
    finally:
        held.close()
        other.close()
