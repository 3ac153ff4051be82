"""The set-up as `check` and `run` see it: the directories `run` creates itself, and an
nbd-server whose config cannot serve the worker's exports (another `-C` than the pinned one,
or an includedir that is not the snippet directory): one clear message at start-up, on
/readyz and in `check`, and jobs answered at once instead of retried."""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from aio_pika.abc import AbstractConnection

from harness.nbd import NbdServerProcess, free_port
from harness.worker_process import env_for
from tests.conftest import job, make_disk, run_worker_cli, running_worker, scheduler_for
from worker.settings import Settings

pytestmark = pytest.mark.integration


def readyz(port: int) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


async def test_check_passes_where_run_would_create_the_directories(
    settings: Settings, tmp_path: Path
) -> None:
    state = tmp_path / "not-yet" / "state"
    fresh = settings.model_copy(update={"link_dir": state / "links", "auth_dir": state / "auth"})
    assert not state.exists()
    done = await asyncio.to_thread(run_worker_cli, "check", env=env_for(fresh))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"ok   link directory {state / 'links'} writable" in done.stdout
    assert f"ok   authfile directory {state / 'auth'} writable" in done.stdout

    # `run` agrees: it starts, and makes both.
    async with running_worker(fresh):
        assert (state / "links").is_dir()
        assert (state / "auth").is_dir()

    # One it could not create is still a failure.
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    blocked = fresh.model_copy(update={"link_dir": blocker / "links"})
    done = await asyncio.to_thread(run_worker_cli, "check", env=env_for(blocked))
    assert done.returncode == 1
    assert f"FAIL link directory {blocker / 'links'} writable: {blocker} is not a directory" in (
        done.stdout
    )


@pytest.mark.parametrize("mistake", ["includedir", "pinned config"])
async def test_a_misconfigured_server_is_named_once_and_jobs_are_not_retried(
    mistake: str,
    settings: Settings,
    nbd_server: NbdServerProcess,
    amqp: AbstractConnection,
    disks_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    update: dict[str, object] = {"metrics_port": free_port(), "housekeeping_interval_s": 0.1}
    if mistake == "includedir":
        # The server reads snippets from another directory than the worker writes them to;
        # the worker takes the config path from the server's command line (no pin).
        other = nbd_server.root / "other.d"
        other.mkdir()
        nbd_server.stop()
        nbd_server.config_file.write_text(
            nbd_server.config_file.read_text().replace(
                f"includedir = {nbd_server.conf_dir}", f"includedir = {other}"
            )
        )
        nbd_server.start()
        update["nbd_config_file"] = None
        expected = f"its includedir is {other}, but the worker writes snippets to "
    else:
        update["nbd_config_file"] = Path("/etc/nbd-server/another-config")
        expected = f"runs with config {nbd_server.config_file}, but EXPORT_WORKER_NBD_CONFIG"
    wrong = settings.model_copy(update=update)

    check = await asyncio.to_thread(run_worker_cli, "check", env=env_for(wrong))
    assert check.returncode == 1
    failures = [line for line in check.stdout.splitlines() if line.startswith("FAIL")]
    assert len(failures) == 1, check.stdout
    assert expected in failures[0]

    disk = make_disk(disks_dir, "misconfigured.img")
    with caplog.at_level(logging.INFO, logger="worker"):
        async with running_worker(wrong) as worker:
            # Housekeeping keeps the readiness gauge, for alerts, without /readyz polls. Its
            # first round may take a while on a loaded machine: polled, not a fixed sleep.
            def gauge() -> dict[str, float | None]:
                return {
                    check: worker.metrics.registry.get_sample_value(
                        "nbd_export_worker_ready", {"check": check, "node": wrong.node_id}
                    )
                    for check in ("broker", "database", "nbd_server", "nbd_data_path")
                }

            expected_ready = {"broker": 1, "database": 1, "nbd_server": 0, "nbd_data_path": 0}
            deadline = asyncio.get_running_loop().time() + 10
            while (ready := gauge()) != expected_ready:
                if asyncio.get_running_loop().time() > deadline:
                    break
                await asyncio.sleep(0.05)
            assert ready == expected_ready
            status, body = await asyncio.to_thread(readyz, wrong.metrics_port)
            assert status == 503
            checks = body["checks"]
            assert isinstance(checks, dict)
            assert expected in checks["nbd_server"]

            scheduler = await scheduler_for(amqp, wrong)
            try:
                reply = await scheduler.request(job(device=disk), timeout_s=10)
            finally:
                await scheduler.channel.close()
            assert reply["status"] == "error"
            assert reply["error"]["code"] == "nbd_server_misconfigured"
            assert expected in reply["error"]["message"]
            await asyncio.sleep(0.5)  # several housekeeping rounds
    said = [r.getMessage() for r in caplog.records if expected in r.getMessage()]
    # Once at start-up, once by housekeeping, once for the job: not every round.
    assert len([m for m in said if m.startswith("nbd-server is misconfigured")]) == 1
    assert len([m for m in said if m.startswith("Housekeeping failed")]) == 1
    assert not [m for m in said if "Returning job to the queue" in m]
    requeued = [r for r in caplog.records if r.getMessage().startswith("Returning job")]
    assert requeued == []
